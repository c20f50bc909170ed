"""Tokenizers behind one small interface: Hugging Face (`transformers`) or SentencePiece.

    tok = load_tokenizer("path/to/hf_dir")                # or a .model file / a dir holding tokenizer.model
    ids = tok.encode_chat([{"role": "user", "content": "2+2?"}], enable_thinking=False)
    spans = tok.token_char_offsets(response_ids)          # char span of each token in tok.decode(response_ids)

Chat formatting: a Hugging Face tokenizer with a chat template uses it (Qwen3's template honours
`enable_thinking`); everything else uses the ChatML-style plain template

    <|im_start|>{role}\n{content}<|im_end|>\n   ...   <|im_start|>assistant\n   (generation prompt)

where `<|im_end|>` ends a turn and is one of `stop_token_ids`. SentencePiece models made by
`train_sentencepiece_tokenizer` hold `<|im_start|>` and `<|im_end|>` as single user-defined pieces,
pad id 0, eos id 1, unk id 2, no BOS, identity normalization and no dummy prefix, so that
`encode(a) + encode(b)` decodes to `a + b` and newlines survive.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Sequence

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_SPECIAL_TOKENS = (IM_START, IM_END)
# Tokens that end an assistant turn in common chat formats (ChatML/Qwen, Llama-3).
_KNOWN_STOP_TOKENS = (IM_END, "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")
SP_MODEL_NAME = "tokenizer.model"


def render_plain_chat(messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
    """The ChatML-style plain template used when a tokenizer has no chat template of its own."""
    out = []
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] needs 'role' and 'content', got keys {sorted(m)}")
        out.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


class Tokenizer:
    """Common interface; subclasses implement `encode`, `_decode` and `apply_chat`."""

    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    stop_token_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:  # pragma: no cover
        raise NotImplementedError

    def apply_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                   enable_thinking: bool | None = None) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are kept by default so offsets and texts line up."""
        return self._decode([int(i) for i in ids], skip_special_tokens)

    def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                    enable_thinking: bool | None = None, assistant_prefix: str = "") -> list[int]:
        """Token ids of the rendered chat, plus `assistant_prefix` appended to the opened assistant turn."""
        text = self.apply_chat(messages, add_generation_prompt=add_generation_prompt,
                               enable_thinking=enable_thinking)
        return self.encode(text + assistant_prefix)

    def token_char_offsets(self, ids: Sequence[int], *, skip_special_tokens: bool = False
                           ) -> list[tuple[int, int]]:
        """(start, end) character span of each token inside `self.decode(ids)`.

        Computed by incremental decoding (each token is decoded together with a few tokens of left
        context, so SentencePiece's leading-space handling and byte-level BPE merges are seen the way
        the full decode sees them). A character whose UTF-8 bytes are split over several tokens is
        attributed to the first of those tokens; the tokens that only complete it get an empty span
        at the character's end. Spans are contiguous and the last end is `len(self.decode(ids))`.
        """
        ids = [int(i) for i in ids]
        full = self._decode(ids, skip_special_tokens)
        spans = self._incremental_offsets(ids, skip_special_tokens, window=True)
        if spans is None or (spans[-1][1] if spans else 0) != len(full):
            # Rare: a decoder whose output is not prefix-stable; use whole-prefix decoding.
            spans = self._incremental_offsets(ids, skip_special_tokens, window=False)
        assert spans is not None and (not spans or spans[-1][1] == len(full)), "offsets do not cover the text"
        return spans

    def _incremental_offsets(self, ids: list[int], skip: bool, window: bool):
        spans: list[tuple[int, int]] = []
        emitted = ""
        prefix_offset = 0  # start of the left context window
        read_offset = 0  # ids[:read_offset] have been turned into text
        pending: list[int] = []  # tokens whose bytes have not yet produced a full character
        for i in range(len(ids)):
            start = prefix_offset if window else 0
            prefix_text = self._decode(ids[start:read_offset], skip)
            new_text = self._decode(ids[start:i + 1], skip)
            if new_text.endswith("\ufffd"):
                pending.append(i)  # a partial UTF-8 character: wait for the bytes that complete it
                continue
            if not new_text.startswith(prefix_text):
                if window:
                    return None
                raise ValueError("decoding is not prefix-stable; cannot compute token offsets")
            piece = new_text[len(prefix_text):]
            pos = len(emitted)
            # the first contributing token gets the text, tokens that only completed it an empty span
            spans.append((pos, pos + len(piece)))
            spans.extend((pos + len(piece), pos + len(piece)) for _ in pending)
            emitted += piece
            pending = []
            prefix_offset, read_offset = read_offset, i + 1
        if pending:  # trailing incomplete character: the full decode shows replacement chars
            tail = self._decode(ids, skip)[len(emitted):]
            pos = len(emitted)
            spans.append((pos, pos + len(tail)))
            spans.extend((pos + len(tail), pos + len(tail)) for _ in pending[1:])
            emitted += tail
        if emitted != self._decode(ids, skip):
            if window:
                return None
            raise ValueError("incremental decoding does not reproduce the full decode")
        return spans


class HFTokenizer(Tokenizer):
    """Wraps a `transformers` tokenizer. Uses its chat template when it has one."""

    def __init__(self, hf_tokenizer, *, extra_stop_token_ids: Iterable[int] = ()):
        self.hf = hf_tokenizer
        self.has_chat_template = bool(getattr(hf_tokenizer, "chat_template", None))
        if not self.has_chat_template:
            vocab = hf_tokenizer.get_vocab()
            missing = [t for t in CHAT_SPECIAL_TOKENS if t not in vocab]
            if missing:
                warnings.warn(f"tokenizer has no chat template and lacks {missing}; adding them as special "
                              "tokens (vocab grows; the model's embedding must cover it)")
                hf_tokenizer.add_special_tokens({"additional_special_tokens": missing})
        vocab = hf_tokenizer.get_vocab()
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            eos = vocab.get(IM_END)
        if eos is None:
            raise ValueError("tokenizer has no eos token and no <|im_end|>; cannot end a turn")
        self.eos_token_id = int(eos)
        pad = hf_tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_id
        stops = [self.eos_token_id] + [vocab[t] for t in _KNOWN_STOP_TOKENS if t in vocab]
        stops += [int(i) for i in extra_stop_token_ids]
        self.stop_token_ids = tuple(dict.fromkeys(stops))
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def _decode(self, ids, skip_special_tokens):
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def apply_chat(self, messages, *, add_generation_prompt=True, enable_thinking=None):
        if not self.has_chat_template:
            return render_plain_chat(messages, add_generation_prompt=add_generation_prompt)
        kwargs = {} if enable_thinking is None else {"enable_thinking": bool(enable_thinking)}
        return self.hf.apply_chat_template(list(messages), tokenize=False,
                                           add_generation_prompt=add_generation_prompt, **kwargs)


class SentencePieceTokenizer(Tokenizer):
    """Wraps a SentencePiece model; always the plain chat template (`enable_thinking` is ignored)."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.model_file = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        for t in CHAT_SPECIAL_TOKENS:
            if self.sp.piece_to_id(t) == self.sp.unk_id():
                raise ValueError(f"{model_file}: sentencepiece model lacks the piece {t!r}; "
                                 "train it with train_sentencepiece_tokenizer")
        self.vocab_size = int(self.sp.get_piece_size())
        eos = self.sp.eos_id()
        self.im_end_id = int(self.sp.piece_to_id(IM_END))
        self.eos_token_id = int(eos) if eos >= 0 else self.im_end_id
        pad = self.sp.pad_id()
        self.pad_token_id = int(pad) if pad >= 0 else self.eos_token_id
        self.stop_token_ids = tuple(dict.fromkeys([self.im_end_id, self.eos_token_id]))
        self._control = {i for i in (self.sp.eos_id(), self.sp.pad_id(), self.sp.bos_id()) if i >= 0}
        self._special = self._control | {int(self.sp.piece_to_id(t)) for t in CHAT_SPECIAL_TOKENS}

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text, out_type=int))

    def _decode(self, ids, skip_special_tokens):
        # SentencePiece drops control pieces (pad/eos) when decoding; render them explicitly so that
        # a response ending in eos still has one span per token and decode is reversible in length.
        out, run = [], []
        for i in ids:
            if i in self._control or (skip_special_tokens and i in self._special):
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def apply_chat(self, messages, *, add_generation_prompt=True, enable_thinking=None):
        return render_plain_chat(messages, add_generation_prompt=add_generation_prompt)


def train_sentencepiece_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int, *,
                                  model_type: str = "bpe", byte_fallback: bool | None = None,
                                  user_defined_symbols: Sequence[str] = ()) -> SentencePieceTokenizer:
    """Trains a SentencePiece model on `texts` and saves `out_dir/tokenizer.model` (atomically).

    Ids: pad 0, eos 1 (`</s>`), unk 2, then `<|im_start|>`, `<|im_end|>` (3, 4) and any extra
    `user_defined_symbols`. `vocab_size` is a soft limit: a small corpus may yield fewer pieces, so
    read `.vocab_size` of the result. `byte_fallback` (default: on when vocab_size >= 512) encodes
    characters never seen in training as UTF-8 byte pieces instead of unk; it costs 256 ids.
    Characters of the training texts are all covered (character_coverage 1.0).
    """
    import sentencepiece as spm

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece_tokenizer: no non-empty texts given")
    if byte_fallback is None:
        byte_fallback = vocab_size >= 512
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Sentencepiece reads one sentence per line; newlines inside a text are written as separate lines
    # and the newline character itself is added as a required symbol so chat templates encode.
    symbols = list(CHAT_SPECIAL_TOKENS) + [s for s in user_defined_symbols if s not in CHAT_SPECIAL_TOKENS]
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        corpus = Path(tmp) / "corpus.txt"
        with open(corpus, "w", encoding="utf-8") as f:
            for t in texts:
                for line in t.split("\n"):
                    if line.strip():
                        f.write(line + "\n")
        prefix = Path(tmp) / "sp"
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(prefix), vocab_size=int(vocab_size),
            model_type=model_type, character_coverage=1.0, byte_fallback=bool(byte_fallback),
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            user_defined_symbols=symbols + ["\n"], normalization_rule_name="identity",
            add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True, hard_vocab_limit=False, train_extremely_large_corpus=False,
            minloglevel=2, num_threads=1,
        )
        os.replace(str(prefix) + ".model", out_dir / SP_MODEL_NAME)
    return SentencePieceTokenizer(out_dir / SP_MODEL_NAME)


def _generation_eos_ids(path: Path) -> list[int]:
    cfg = path / "generation_config.json"
    if not cfg.is_file():
        return []
    eos = json.loads(cfg.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A Hugging Face tokenizer dir, a SentencePiece `.model` file, or a dir holding `tokenizer.model` only."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".model":
            return SentencePieceTokenizer(path)
        raise ValueError(f"{path}: expected a sentencepiece .model file or a tokenizer directory")
    if not path.is_dir():
        raise ValueError(f"{path}: tokenizer path does not exist")
    hf_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if any((path / f).is_file() for f in hf_files):
        import transformers

        hf = transformers.AutoTokenizer.from_pretrained(str(path))
        return HFTokenizer(hf, extra_stop_token_ids=_generation_eos_ids(path))
    models = sorted(path.glob("*.model"))
    if (path / SP_MODEL_NAME).is_file():
        return SentencePieceTokenizer(path / SP_MODEL_NAME)
    if len(models) == 1:
        return SentencePieceTokenizer(models[0])
    raise ValueError(f"{path}: no tokenizer.json/tokenizer_config.json and no single *.model file")


# A Qwen3-style chat template (our wording of the ChatML layout); `enable_thinking=False` pre-fills an
# empty think block exactly like Qwen3 does, so prompts look the same as with the real tokenizer.
QWEN3_STYLE_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}"
)


def train_byte_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int, *,
                             chat_template: str | None = QWEN3_STYLE_CHAT_TEMPLATE) -> HFTokenizer:
    """Trains a tiny byte-level BPE Hugging Face tokenizer (saved with `save_pretrained` into `out_dir`).

    Special tokens: `<|endoftext|>` (pad, id 0), `<|im_end|>` (eos, id 1), `<|im_start|>` (id 2), then
    `<think>`, `</think>`; mirrors the Qwen3 layout for tests and tiny demos. `chat_template=None`
    saves it without a template (the plain template is then used).
    """
    import tokenizers
    import transformers

    specials = ["<|endoftext|>", IM_END, IM_START, "<think>", "</think>"]
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=int(vocab_size), special_tokens=specials, show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([t for t in texts if t], trainer=trainer)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token=IM_END, pad_token="<|endoftext|>",
        additional_special_tokens=[IM_START, "<think>", "</think>"])
    if chat_template is not None:
        hf.chat_template = chat_template
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return HFTokenizer(transformers.AutoTokenizer.from_pretrained(str(out_dir)))
