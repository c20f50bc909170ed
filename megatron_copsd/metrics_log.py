"""Where per-step metrics go: `<output_dir>/metrics.jsonl`, TensorBoard, W&B (optional), a tqdm bar.

    log = MetricsLogger(output_dir, tensorboard=True, wandb=False, progress_bar=True, total_steps=100,
                        start_step=0, config=cfg_dict, enabled=(rank == 0))
    log.log(step, {"loss": 0.1, ...}); log.close()

Only the rank that is `enabled` writes anything. The JSONL file is appended line by line and flushed
every step (a killed run keeps every completed step). `step` counts completed optimizer steps (1..N,
like the checkpoint folders step_N); on resume from step s, lines with `step > s` from the interrupted
run are dropped first so the file has one line per step.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

BAR_KEYS = ("loss", "divergence", "reward", "response_len")


def _clean(v: Any):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def truncate_jsonl(path: Path, start_step: int) -> None:
    """Drops records with step > start_step, i.e. of steps a resumed run will redo (atomic rewrite)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written last line from a killed run
        if rec.get("step", -1) <= start_step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "megatron-copsd", progress_bar: bool = True, total_steps: int = 0,
                 start_step: int = 0, config: Optional[dict] = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = self._wandb = self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, start_step)
        self._f = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step)
        if wandb:
            import wandb as wandb_mod

            self._wandb = wandb_mod.init(project=wandb_project, config=config or {}, dir=str(output_dir),
                                         resume="allow")
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict, *, advance: bool = True) -> None:
        """Appends one record; `advance=False` for extra records of a step (eval) that should not move the bar."""
        if not self.enabled:
            return
        rec = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._bar is not None and advance:
            self._bar.update(1)
            self._bar.set_postfix({k: f"{numeric[k]:.4g}" for k in BAR_KEYS if k in numeric})

    def message(self, text: str) -> None:
        """A line for humans (through tqdm so it does not break the bar)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._bar is not None:
            self._bar.close()
