"""Shared material for the ROSD unit tests: two small real tokenizers and a scripted failed response."""
from __future__ import annotations

import functools
import tempfile

from megatron_copsd.data.tokenizer import train_byte_bpe_tokenizer, train_sentencepiece_tokenizer

# A failed solution whose first wrong step is "12 \times 4 = 46" in Step 2.
FAILED = (
    "Step 1: Each box holds 12 apples, and there are 4 boxes.\n"
    "Step 2: So the total is $12 \\times 4 = 46$ apples.\n"
    "Step 3: She gives away 10, leaving 36 apples.\n"
    "The answer is \\boxed{36}."
)
CORRECT = (
    "Step 1: There are 4 boxes with 12 apples each.\n"
    "Step 2: The total is $12 \\times 4 = 48$ apples.\n"
    "Step 3: After giving away 10, 38 apples remain.\n"
    "The answer is \\boxed{38}."
)
PROBLEM = "Mia has 4 boxes of 12 apples and gives away 10. How many apples are left?"
# Amharic text before the error: characters outside ASCII (multi-byte, byte-fallback pieces) shift
# char vs byte positions.
FAILED_AMH = "ሰላም ልጆች። 3 ቤቶች አሉ።\nSo 7 − 2 = 4 and then we add 1.\nAnswer: \\boxed{5}"

CORPUS = [FAILED, CORRECT, PROBLEM, FAILED_AMH,
          "Janet's ducks lay 16 eggs per day. She eats three for breakfast.\nHow many are left?",
          "The total is 12 times 4, so we multiply: 12 * 4 = 48. Then 48 - 10 = 38.",
          "ሰላም ልጆች 12 ብርቱካን አሉ", "Ответ: \\boxed{7}", "answer explanation error quote solution problem"] * 20


@functools.lru_cache(maxsize=None)
def bpe_tokenizer():
    """Hugging Face byte-level BPE (trained offline with `tokenizers`), Qwen3-style chat template."""
    return train_byte_bpe_tokenizer(CORPUS, tempfile.mkdtemp(prefix="rosd_bpe_"), 420)


@functools.lru_cache(maxsize=None)
def sp_tokenizer():
    """SentencePiece BPE with byte fallback, plain ChatML template."""
    return train_sentencepiece_tokenizer(CORPUS, tempfile.mkdtemp(prefix="rosd_sp_"), 700)


def tokenizer(name: str):
    return {"bpe": bpe_tokenizer, "sp": sp_tokenizer}[name]()


def expected_token_index(tok, ids, char: int) -> int:
    """Independent of token_char_offsets: the last k whose decoded prefix ids[:k] is a clean prefix of
    the text no longer than `char` (so token k holds -- or starts the bytes of -- character `char`)."""
    text = tok.decode(ids)
    best = 0
    for k in range(len(ids) + 1):
        pre = tok.decode(ids[:k])
        if len(pre) <= char and text.startswith(pre) and "\ufffd" not in pre:
            best = k
    return best
