"""Tokenizer wrappers: chat templates, special ids, incremental-decoding offsets."""
import pytest

from megatron_copsd.data.tokenizer import (IM_END, IM_START, HFTokenizer, SentencePieceTokenizer,
                                           load_tokenizer, render_plain_chat, train_byte_bpe_tokenizer,
                                           train_sentencepiece_tokenizer)

CORPUS = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast.\nHow many are left?",
    "Bata wa Janet hutaga mayai 16 kwa siku. Anakula matatu.",
    "Les canards de Janet pondent 16 œufs par jour.",
    "ሰላም ልጆች 12 ብርቱካን አሉ", "答案是 \\boxed{42}。", "Ответ: \\boxed{7}",
] * 10
TRICKY = ["hello wörld 😀 \n ሰላም", " leading space", "a  b\n\n\tc", "Ответ \\boxed{1,234}", "ꕙꔤ 答",
          "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return train_sentencepiece_tokenizer(CORPUS, tmp_path_factory.mktemp("sp"), 600)


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    return train_byte_bpe_tokenizer(CORPUS, tmp_path_factory.mktemp("bpe"), 400)


@pytest.fixture(scope="module")
def bpe_plain(tmp_path_factory):
    return train_byte_bpe_tokenizer(CORPUS, tmp_path_factory.mktemp("bpe_plain"), 400, chat_template=None)


@pytest.fixture(params=["sp", "bpe", "bpe_plain"])
def tok(request):
    return request.getfixturevalue({"sp": "sp_tok", "bpe": "bpe_tok", "bpe_plain": "bpe_plain"}[request.param])


def test_sentencepiece_ids_and_special_pieces(sp_tok):
    assert isinstance(sp_tok, SentencePieceTokenizer)
    assert (sp_tok.pad_token_id, sp_tok.eos_token_id) == (0, 1)
    im_start, im_end = sp_tok.encode(IM_START), sp_tok.encode(IM_END)
    assert len(im_start) == 1 and len(im_end) == 1
    assert im_end[0] in sp_tok.stop_token_ids and sp_tok.eos_token_id in sp_tok.stop_token_ids
    assert sp_tok.vocab_size <= 600


@pytest.mark.parametrize("text", TRICKY)
def test_roundtrip_and_offsets(tok, text):
    ids = tok.encode(text)
    full = tok.decode(ids)
    assert full == text
    spans = tok.token_char_offsets(ids)
    assert len(spans) == len(ids)
    pos = 0
    for s, e in spans:  # contiguous, covering the text
        assert s == pos and e >= s
        pos = e
    assert pos == len(full)
    # whenever a prefix decodes to whole characters, the spans so far cover exactly that prefix text
    for i, (_, e) in enumerate(spans):
        prefix = tok.decode(ids[: i + 1])
        if not prefix.endswith("\ufffd"):
            assert full[:e] == prefix


def test_offsets_partial_utf8_attributed_to_first_byte_token(sp_tok):
    # vai/emoji characters never seen in training -> byte-fallback pieces, several tokens per char
    text = "x😀y"
    ids = sp_tok.encode(text)
    assert len(ids) > 3, "expected byte-fallback pieces for the emoji"
    spans = sp_tok.token_char_offsets(ids)
    emoji_tokens = [i for i, (s, e) in enumerate(spans) if s <= 1 < e or (s == e == 2)]
    first = emoji_tokens[0]
    assert spans[first] == (1, 2)
    assert all(spans[i] == (2, 2) for i in emoji_tokens[1:])
    assert len(emoji_tokens) == 4  # 4 UTF-8 bytes


def test_offsets_leading_space_pieces(sp_tok, bpe_tok):
    for t in (sp_tok, bpe_tok):
        a = t.encode("She eats")
        b = t.encode(" three")
        spans = t.token_char_offsets(a + b)
        text = t.decode(a + b)
        assert text == "She eats three"
        # the first token of the second piece starts at the space
        assert spans[len(a)][0] == len("She eats")


def test_offsets_with_eos_and_trailing_partial(sp_tok):
    ids = sp_tok.encode("ok") + [sp_tok.eos_token_id]
    spans = sp_tok.token_char_offsets(ids)
    assert sp_tok.decode(ids) == "ok</s>" and spans[-1] == (2, 6)
    assert sp_tok.decode(ids, skip_special_tokens=True) == "ok"
    part = sp_tok.encode("😀")[:2]  # truncated mid-character (e.g. max_new_tokens hit)
    spans = sp_tok.token_char_offsets(part)
    assert spans[-1][1] == len(sp_tok.decode(part))


def test_chat_templates(bpe_tok, bpe_plain, sp_tok):
    msgs = [{"role": "user", "content": "2+2?"}]
    plain = f"{IM_START}user\n2+2?{IM_END}\n{IM_START}assistant\n"
    assert render_plain_chat(msgs) == plain
    assert sp_tok.apply_chat(msgs) == plain and bpe_plain.apply_chat(msgs) == plain
    assert bpe_tok.apply_chat(msgs, enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    assert bpe_tok.apply_chat(msgs, enable_thinking=True) == plain
    for t in (sp_tok, bpe_tok, bpe_plain):
        ids = t.encode_chat(msgs, assistant_prefix="Let")
        assert t.decode(ids) == t.apply_chat(msgs) + "Let"
        assert ids.count(t.encode(IM_END)[0]) == 1
    with pytest.raises(ValueError, match="role"):
        render_plain_chat([{"content": "x"}])


def test_load_tokenizer_dispatch(tmp_path, sp_tok, bpe_tok):
    assert isinstance(load_tokenizer(sp_tok.model_file), SentencePieceTokenizer)
    from pathlib import Path
    assert isinstance(load_tokenizer(Path(sp_tok.model_file).parent), SentencePieceTokenizer)
    d = tmp_path / "hf"
    bpe_tok.hf.save_pretrained(str(d))
    (d / "generation_config.json").write_text('{"eos_token_id": [1, 3]}')
    t = load_tokenizer(d)
    assert isinstance(t, HFTokenizer) and 3 in t.stop_token_ids and t.eos_token_id == 1
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer(tmp_path / "empty")
