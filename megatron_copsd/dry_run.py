"""`copsd dry-run`: one full training step of the real code path on meta tensors, per simulated rank.

    copsd dry-run --config examples/qwen3_8b_copsd.yaml [--world-size 8] [--ranks first,last] [overrides]

    (model.hf_path need not exist here: examples/hf_configs/<name>/config.json is used for Qwen3-1.7B/4B/8B)

What runs: the trainer's own phases (`Trainer.microbatches`, `score_with_teacher`, `train_step`,
`sync_weights`) on the policy / teacher that `run_setup` builds, so the teacher pass, the student
forward/backward through megatron-core's pipeline schedule, the fused divergence (custom op, fake
implementation), the optimizer step and the weight gather for the rollout engine are the real code. It
runs at the config's TP x PP x DP on a fake process group; one process simulates one rank at a time
(default: the first rank of the first and of the last pipeline stage -- embedding vs LM head + loss).
The model comes from the HF `config.json` only: weights are never loaded (meta tensors hold none). The
rollout is replaced by synthetic sequences of worst-case length (every response `rollout.max_new_tokens`
long unless told otherwise; prompt lengths are options), so memory is an upper bound for that budget.

Two steps run: the first creates Adam's moments (as on a GPU), the second is measured. Reported per
rank: the peak of live device bytes in the second step and what was alive at that moment, by the phase
that allocated it (weights, gradients, optimizer state, teacher, teacher-pass outputs, activations,
divergence workspace, micro-batch inputs, the weight gather for the engine), plus the embedded rollout engine (an analytic estimate: full bf16 copy +
KV cache) on rank 0 when `rollout.engine=embedded`. The bytes are tensor storage sizes: CUDA's caching
allocator, NCCL buffers, CUDA context (~0.5-1 GB) and fragmentation come on top. See
megatron/dry_run_compat.py for the patches and what the checks can and cannot prove.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megatron_copsd.config import Config, load_config

GB = 1024 ** 3
CATEGORIES = ("weights", "gradients", "optimizer state", "teacher", "teacher-pass outputs", "activations",
              "divergence workspace", "inputs", "weight sync", "other")
HF_CONFIG_DIR = Path(__file__).resolve().parent.parent / "examples" / "hf_configs"


@dataclass
class RankReport:
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    peak_bytes: int
    breakdown: dict
    engine_bytes: int = 0
    microbatches: int = 0
    sequences: int = 0
    seconds: float = 0.0
    notes: list = field(default_factory=list)
    phase_peaks: dict = field(default_factory=dict)  # phase -> {category: bytes} at that phase's own peak
    peak_phase: str = ""

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + self.engine_bytes


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower().replace(".", "p") if ch.isalnum())


def resolve_hf_config(cfg: Config, override: str | None = None) -> Path:
    """The config.json to build the model from: --hf-config, else model.hf_path when it exists here, else
    the shipped examples/hf_configs/<name>/config.json whose folder name matches hf_path's last part."""
    if override:
        path = Path(override)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"--hf-config: no config.json at {override!r}")
        return path
    hf = Path(cfg.model.hf_path)
    if (hf / "config.json").is_file():
        return hf / "config.json"
    key = _norm(hf.name)
    for cand in sorted(HF_CONFIG_DIR.glob("*/config.json")):
        if _norm(cand.parent.name) == key:
            return cand
    known = ", ".join(p.parent.name for p in sorted(HF_CONFIG_DIR.glob("*/config.json")))
    raise ValueError(f"config field model.hf_path: {cfg.model.hf_path!r} has no config.json here and matches no "
                     f"shipped config ({known}); pass --hf-config PATH")


def _synthetic_items(cfg: Config, n: int, student_prompt: int, teacher_prompt: int, response: int):
    from megatron_copsd.batching import TrainItem

    with_teacher = cfg.objective.name in ("copsd", "sampled_kl", "rosd")
    return [TrainItem([1] * student_prompt, [1] * (teacher_prompt if with_teacher else student_prompt),
                      [1] * response, rollout_logprobs=[-1.0] * response, advantage=1.0, index=i)
            for i in range(n)]


def _uniform_count(n: int, dp: int, per_mb: int) -> int:
    """Sequences per step rounded up so that every DP rank gets whole, equally shaped micro-batches (the
    fake p2p shape exchange answers one shape per pass)."""
    unit = dp * per_mb
    return max(unit, -(-n // unit) * unit)


def _embedded_engine_bytes(cfg: Config, hf_config) -> int:
    """Full model copy in bf16 plus a KV cache for max_batch_size rows of prompt + response tokens."""
    from megatron_copsd.megatron.model_provider import head_dim, num_kv_heads

    h, layers, v = hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.vocab_size
    ffn, heads, kv, hd = hf_config.intermediate_size, hf_config.num_attention_heads, num_kv_heads(hf_config), head_dim(hf_config)
    per_layer = h * hd * (heads + 2 * kv) + heads * hd * h + 3 * h * ffn + 4 * h
    params = layers * per_layer + v * h * (1 if getattr(hf_config, "tie_word_embeddings", False) else 2) + h
    tokens = cfg.rollout.max_batch_size * (cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens)
    return 2 * params + 2 * layers * 2 * kv * hd * tokens


def _trainer_view(cfg, info, hf_config, policy, teacher, spec):
    """A Trainer whose model side is set up but which never loads data or starts an engine: the dry run
    calls its phase methods exactly as `Trainer._loop` does."""
    from types import SimpleNamespace

    from megatron_copsd.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    pad = getattr(hf_config, "pad_token_id", None) or getattr(hf_config, "eos_token_id", None) or 0
    pad = pad[0] if isinstance(pad, list) else pad
    trainer.__dict__.update(cfg=cfg, info=info, rank=info.rank, hf_config=hf_config, policy=policy, teacher=teacher,
                            spec=spec, engine=None, tok=SimpleNamespace(pad_token_id=int(pad)), step=0,
                            nonfinite_total=0, nonfinite_in_a_row=0, ckpt_root=Path(cfg.train.output_dir) / "checkpoints")
    return trainer


def _optimizer_state_tensors(optimizer):
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        for state in (inner.state.values() if inner is not None else []):
            yield from (v for v in state.values() if torch.is_tensor(v))


def simulate_rank(cfg: Config, hf_config_path: Path, *, rank: int, world_size: int, student_prompt: int,
                  teacher_prompt: int, response: int, steps: int = 2) -> RankReport:
    from megatron_copsd import run_setup
    from megatron_copsd.batching import num_response_tokens
    from megatron_copsd.derived_args import resolve_dtype
    from megatron_copsd.megatron.dist import check_parallel_sizes, init_distributed
    from megatron_copsd.megatron.dry_run_compat import DryRunEnvironment, no_weight_loading
    from megatron_copsd.megatron.model_provider import load_hf_config
    from megatron_copsd.trainer import objective_spec, teacher_mode

    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = check_parallel_sizes(world_size, tp, pp)
    hf_config = load_hf_config(hf_config_path)
    t0 = time.perf_counter()
    with DryRunEnvironment(rank, world_size) as env:
        mem = env.memory
        env.init_model_parallel(tp, pp)
        info = init_distributed(tp, pp, seed=cfg.train.seed)
        dtype = resolve_dtype(cfg, torch.cuda.is_available())
        hf_dir = hf_config_path.parent
        with no_weight_loading():
            with mem.phase("policy build"):
                policy = run_setup.build_policy(cfg, hf_dir, hf_config, dtype)
            mem.retag((p for p in policy.model.parameters()), "weights")
            for buf in getattr(policy.model, "buffers", []):
                mem.retag([buf.param_data] if buf.param_data is not None else [], "weights")
                mem.retag([buf.grad_data], "gradients")
            mem.rename("policy build", "optimizer state")
            with mem.phase("teacher"):
                teacher = run_setup.Teacher(teacher_mode(cfg), policy,
                                            lambda: run_setup.build_frozen_copy(cfg, hf_dir, hf_config, dtype),
                                            decay=cfg.objective.ema_decay, offload=cfg.objective.offload_teacher)
        spec = objective_spec(cfg, hf_config, teacher.separate_weights)
        trainer = _trainer_view(cfg, info, hf_config, policy, teacher, spec)
        seq = max(student_prompt, teacher_prompt) + response - 1
        per_mb = max(1, cfg.train.micro_batch_tokens // seq)
        n = cfg.data.prompts_per_step * cfg.rollout.n
        if pp > 1:
            n = _uniform_count(n, dp, per_mb)
        items = _synthetic_items(cfg, n, student_prompt, teacher_prompt, response)
        report = RankReport(rank=rank, tp_rank=info.tp_rank, pp_rank=info.pp_rank, dp_rank=info.dp_rank,
                            peak_bytes=0, breakdown={}, sequences=n)
        for step in range(steps):
            if step == steps - 1:
                mem.reset_peak()
            with mem.phase("inputs"):
                microbatches = trainer.microbatches(items)
            with mem.phase("teacher-pass outputs"):
                trainer.score_with_teacher(microbatches)
            with mem.phase("activations"):
                trainer.train_step(microbatches, num_response_tokens(items))
            mem.retag(list(_optimizer_state_tensors(policy.optimizer)), "optimizer state")
            with mem.phase("weight sync"):
                trainer.sync_weights(version=step + 1)
            report.microbatches = len(microbatches)
            del microbatches
        report.peak_bytes = mem.peak
        report.breakdown = {k: v for k, v in mem.peak_breakdown.items() if v}
        report.peak_phase = mem.peak_where
        report.phase_peaks = {p: {k: v for k, v in b.items() if v} for p, b in mem.phase_breakdown.items()}
        if pp > 1 and n != cfg.data.prompts_per_step * cfg.rollout.n:
            report.notes.append(f"{n} sequences (rounded up from {cfg.data.prompts_per_step * cfg.rollout.n} "
                                f"to whole micro-batches of {per_mb} per DP rank)")
    if cfg.rollout.engine == "embedded" and rank == 0:
        report.engine_bytes = _embedded_engine_bytes(cfg, hf_config)
    report.seconds = time.perf_counter() - t0
    return report


def format_report(cfg: Config, world_size: int, reports: list[RankReport], hf_config_path: Path,
                  lengths: tuple[int, int, int]) -> str:
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    lines = [f"dry run: {hf_config_path} | TP={tp} PP={pp} DP={world_size // (tp * pp)} (world {world_size}) | "
             f"student prompt {lengths[0]}, teacher prompt {lengths[1]}, response {lengths[2]} tokens | "
             f"micro_batch_tokens {cfg.train.micro_batch_tokens} | distributed optimizer "
             f"{cfg.parallel.use_distributed_optimizer}",
             "peak device memory per simulated rank (GiB of tensor storage; add ~1-3 GiB for CUDA context, NCCL "
             "and allocator slack):"]
    header = ["category"] + [f"rank {r.rank} (pp {r.pp_rank}, tp {r.tp_rank}, dp {r.dp_rank})" for r in reports]
    rows = [[c] + [f"{r.breakdown.get(c, 0) / GB:.2f}" for r in reports] for c in CATEGORIES]
    extra = sorted({k for r in reports for k in r.breakdown} - set(CATEGORIES))
    rows += [[c] + [f"{r.breakdown.get(c, 0) / GB:.2f}" for r in reports] for c in extra]
    if any(r.engine_bytes for r in reports):
        rows.append(["embedded engine (estimate)"] + [f"{r.engine_bytes / GB:.2f}" for r in reports])
    rows.append(["PEAK"] + [f"{r.total_bytes / GB:.2f}" for r in reports])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  " + "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                                      for i, cell in enumerate(row)))
    for r in reports:
        lines.append(f"  rank {r.rank}: peak while in phase '{r.peak_phase}'; {r.sequences} sequences, "
                     f"{r.microbatches} micro-batches on this rank, {r.seconds:.1f} s" + "".join(f"; {n}" for n in r.notes))
    return "\n".join(lines)


def parse_ranks(spec: str, world_size: int, tp: int, pp: int) -> list[int]:
    from megatron_copsd.megatron.dry_run_compat import rank_layout

    named = rank_layout(world_size, tp, pp)
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        r = named[part] if part in named else int(part) if part.isdigit() else None
        if r is None or not 0 <= r < world_size:
            raise ValueError(f"--ranks: {part!r} is not first, last or a rank in [0, {world_size})")
        if r not in out:
            out.append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="copsd dry-run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training YAML")
    ap.add_argument("--hf-config", default=None, help="HF config.json (or its folder); default: see resolve_hf_config")
    ap.add_argument("--world-size", type=int, default=None,
                    help="total ranks (default: one 8-GPU node when tp * pp divides 8, else tp * pp)")
    ap.add_argument("--ranks", default="first,last", help="ranks to simulate: first, last or numbers")
    ap.add_argument("--student-prompt-tokens", type=int, default=256)
    ap.add_argument("--teacher-prompt-tokens", type=int, default=1024,
                    help="privileged prompt: problem + English problem + reference solution")
    ap.add_argument("--response-tokens", type=int, default=None, help="default: rollout.max_new_tokens")
    ap.add_argument("--steps", type=int, default=2, help="training steps (the last one is measured)")
    ap.add_argument("--json", default=None, help="also write the reports as JSON here")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.tp=2")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        hf_path = resolve_hf_config(cfg, args.hf_config)
        tp, pp = cfg.parallel.tp, cfg.parallel.pp
        world = args.world_size or (8 if 8 % (tp * pp) == 0 else tp * pp)
        ranks = parse_ranks(args.ranks, world, tp, pp)
    except ValueError as e:
        print(f"copsd dry-run: {e}", file=sys.stderr)
        return 2
    lengths = (args.student_prompt_tokens, args.teacher_prompt_tokens, args.response_tokens or cfg.rollout.max_new_tokens)
    reports = [simulate_rank(cfg, hf_path, rank=r, world_size=world, student_prompt=lengths[0],
                             teacher_prompt=lengths[1], response=lengths[2], steps=args.steps) for r in ranks]
    print(format_report(cfg, world, reports, hf_path, lengths))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in reports], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
