"""Student and COPSD teacher prompts through the chat templates."""
import pytest

from megatron_copsd.data.languages import get_language
from megatron_copsd.data.prompts import copsd_teacher_prompt, student_prompt
from megatron_copsd.data.tokenizer import train_byte_bpe_tokenizer, train_sentencepiece_tokenizer

CORPUS = ["Bata wa Janet hutaga mayai 16 kwa siku. Tatua tatizo hili hatua kwa hatua.",
          "Janet's ducks lay 16 eggs per day. She sells the rest for $2 each. So 16-3-4=9 eggs; 9*2=18."] * 10
P_SW = "Bata wa Janet hutaga mayai 16 kwa siku."
P_EN = "Janet's ducks lay 16 eggs per day."
S_EN = "16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars. #### 18"


@pytest.fixture(scope="module", params=["sp", "bpe"])
def tok(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "sp":
        return train_sentencepiece_tokenizer(CORPUS, d, 700)  # >= 512: byte fallback for unseen chars
    return train_byte_bpe_tokenizer(CORPUS, d, 350)


def test_student_prompt(tok):
    p = student_prompt(tok, "sw", P_SW)
    assert p.text.endswith("<|im_start|>assistant\n")
    assert P_SW in p.text and get_language("swa").instruction in p.text
    assert "English" not in p.text  # no privileged context leaks into the student prompt
    assert tok.decode(p.ids) == p.text and p.prefix_start == len(p.ids)


def test_reasoning_prefix_is_exact_token_boundary(tok):
    p = student_prompt(tok, "swa", P_SW, use_reasoning_prefix=True)
    prefix = get_language("swa").reasoning_prefix
    assert p.text.endswith("assistant\n" + prefix)
    assert tok.decode(p.ids[p.prefix_start:]) == prefix
    assert tok.decode(p.ids[: p.prefix_start]).endswith("assistant\n")
    t = copsd_teacher_prompt(tok, "swa", P_SW, P_EN, S_EN, use_reasoning_prefix=True)
    assert t.ids[t.prefix_start:] == p.ids[p.prefix_start:]  # same context for the response on both sides


def test_thinking_prefix_opens_think_block(tmp_path):
    tok = train_byte_bpe_tokenizer(CORPUS, tmp_path, 350)
    p = student_prompt(tok, "fr", "2+2 ?", use_reasoning_prefix=True, enable_thinking=True)
    assert p.text.endswith("<think>\n" + get_language("fr").reasoning_prefix)
    q = student_prompt(tok, "fr", "2+2 ?", enable_thinking=False)
    assert q.text.endswith("<think>\n\n</think>\n\n")


def test_teacher_prompt_parts_and_switches(tok):
    labels = get_language("swa").labels()
    t = copsd_teacher_prompt(tok, "swa", P_SW, P_EN, S_EN)
    body = t.user_content
    assert body.index(P_SW) < body.index(P_EN) < body.index(labels.reference_begin) < body.index(S_EN) \
        < body.index(labels.reference_end) < body.index(labels.instruction)
    assert tok.decode(t.ids) == t.text and t.text.endswith("<|im_start|>assistant\n")
    no_en = copsd_teacher_prompt(tok, "swa", P_SW, None, S_EN, include_problem_en=False)
    assert P_EN not in no_en.text and S_EN in no_en.text
    no_sol = copsd_teacher_prompt(tok, "swa", P_SW, P_EN, None, include_reference_solution_en=False)
    assert S_EN not in no_sol.text and labels.reference_begin not in no_sol.text and P_EN in no_sol.text
    bare = copsd_teacher_prompt(tok, "swa", P_SW, None, None, include_problem_en=False,
                                include_reference_solution_en=False)
    assert len(bare.ids) < len(no_sol.ids) < len(t.ids)


def test_missing_fields_raise(tok):
    with pytest.raises(ValueError, match="problem_en"):
        copsd_teacher_prompt(tok, "swa", P_SW, "", S_EN)
    with pytest.raises(ValueError, match="solution_en"):
        copsd_teacher_prompt(tok, "swa", P_SW, P_EN, None)
    with pytest.raises(ValueError, match="problem"):
        student_prompt(tok, "swa", "   ")


# --- data.reasoning_prefix through the trainer's prompt preparation (the reference's --student_enable_thinking)

def _examples():
    from megatron_copsd.data.loaders import Example

    return [Example("a", "fr", "Paul a 3 pommes et en achète 5. Combien en a-t-il ?", "8",
                    problem_en="Paul has 3 apples and buys 5. How many?", solution_en="3 + 5 = 8. \\boxed{8}"),
            Example("b", "swa", P_SW, "18", problem_en=P_EN, solution_en=S_EN)]


@pytest.fixture(scope="module")
def qwen3_tok(tmp_path_factory):
    """Byte-level BPE with Qwen3's special tokens (<think> is one id) and a Qwen3-style chat template."""
    return train_byte_bpe_tokenizer(CORPUS, tmp_path_factory.mktemp("q3"), 350)


def test_reasoning_prefix_on_qwen3_template_ids_and_alignment(qwen3_tok):
    from megatron_copsd.batching import collate
    from megatron_copsd.experience import Rollout, make_train_items, prepare_examples

    tok = qwen3_tok
    think_id = tok.encode("<think>")
    assert len(think_id) == 1
    on, dropped = prepare_examples(_examples(), tok, include_problem_en=True, include_reference_solution_en=True,
                                   max_prompt_tokens=4096, with_teacher=True, reasoning_prefix=True)
    off, _ = prepare_examples(_examples(), tok, include_problem_en=True, include_reference_solution_en=True,
                              max_prompt_tokens=4096, with_teacher=True)
    assert dropped == 0 and len(on) == 2
    for p, q in zip(on, off):
        prefix = get_language(p.example.lang).reasoning_prefix
        tail = think_id + tok.encode("\n") + tok.encode(prefix)
        # both prompts: the unprefixed prompt (opened assistant turn, no empty think block) + <think>\n + prefix
        assert p.student_ids == q.student_ids + tail and p.teacher_ids == q.teacher_ids + tail
        assert tok.decode(p.student_ids).endswith("<|im_start|>assistant\n<think>\n" + prefix)
        assert "</think>" not in tok.decode(p.student_ids) + tok.decode(p.teacher_ids)
        assert p.assistant_prefix == "<think>\n" + prefix and p.enable_thinking is True
    response = tok.encode(" 3 + 5 = 8, \\boxed{8}") + [tok.eos_token_id]
    rollouts = [Rollout(0, response, [-1.0] * len(response), "stop", "", True, True, "8")]
    items, _ = make_train_items(on[:1], rollouts, objective="copsd", n=1)
    mb = collate(items, pad_id=tok.pad_token_id)
    for side in (mb.student, mb.teacher):
        pos = side.resp_pos_idx
        # position of the first response target holds the last prefix token on both sides
        assert side.tokens[0, pos[0]].item() == tok.encode(get_language("fr").reasoning_prefix)[-1]
        assert side.tokens[0, pos[1:]].tolist() == response[:-1]  # teacher forcing on the same response ids
    assert mb.targets.tolist() == response


def test_reasoning_prefix_without_think_token_is_the_bare_prefix(tmp_path):
    from megatron_copsd.experience import prepare_examples
    from megatron_copsd.data.prompts import reasoning_prefix_mode

    tok = train_sentencepiece_tokenizer(CORPUS, tmp_path, 700)  # plain ChatML, no <think> piece
    assert reasoning_prefix_mode(tok, "fr") is None
    on, _ = prepare_examples(_examples()[:1], tok, include_problem_en=True, include_reference_solution_en=True,
                             max_prompt_tokens=4096, with_teacher=True, reasoning_prefix=True)
    prefix = get_language("fr").reasoning_prefix
    assert tok.decode(on[0].student_ids).endswith("<|im_start|>assistant\n" + prefix)
    assert tok.decode(on[0].teacher_ids).endswith("<|im_start|>assistant\n" + prefix)


def test_reasoning_prefix_errors_when_it_cannot_be_honoured(qwen3_tok, tmp_path):
    from megatron_copsd.data.loaders import Example
    from megatron_copsd.data.prompts import reasoning_prefix_mode
    from megatron_copsd.experience import prepare_examples

    hau = [Example("h", "hau", "Audu yana da lemu 3.", "3", problem_en="Audu has 3 oranges.", solution_en="3")]
    kw = dict(include_problem_en=True, include_reference_solution_en=True, max_prompt_tokens=4096, with_teacher=True)
    with pytest.raises(ValueError, match=r"'hau'.*language_overrides"):  # English stand-in: no prefix of its own
        prepare_examples(hau, qwen3_tok, reasoning_prefix=True, **kw)
    assert len(prepare_examples(hau, qwen3_tok, **kw)[0]) == 1  # off: fine
    with pytest.raises(ValueError, match="data.format copsd"):
        prepare_examples(hau, qwen3_tok, reasoning_prefix=True, data_format="tooluse", **kw)
    # a template that closes the think block itself cannot have the reasoning opened inside it
    closing = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}"
               "{% endif %}")
    tok = train_byte_bpe_tokenizer(CORPUS, tmp_path, 350, chat_template=closing)
    with pytest.raises(ValueError, match="already writes a think block"):
        reasoning_prefix_mode(tok, "fr")
