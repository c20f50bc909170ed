#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and Megatron (same as `copsd convert`).

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir HF --out MG --tp 2 --pp 1
    python tools/convert_checkpoint.py megatron-to-hf --megatron-dir MG --out HF2 --tokenizer-dir HF
    python tools/convert_checkpoint.py hf-to-dist --hf-dir HF --out DCP
    python tools/convert_checkpoint.py dist-to-hf --dist-dir DCP --hf-config HF --out HF2
    python tools/convert_checkpoint.py gguf-to-hf --out models/smollm2-135m-instruct   # cached
"""
import sys

from megatron_copsd.checkpoint.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
