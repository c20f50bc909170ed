#!/usr/bin/env python
"""Build COPSD-format training files or download the published data sets.

    python tools/prepare_data.py gsm8k-mgsm --gsm8k ../shared/data/gsm8k/test.jsonl \
        --mgsm-dir ../shared/data/mgsm --langs sw --out data/copsd_mgsm_sw.json

Same as `copsd prepare-data ...`; see megatron_copsd/data/prepare.py for every subcommand.
"""
import sys

from megatron_copsd.data.prepare import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
