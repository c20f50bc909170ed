"""The run configuration: one dataclass tree, loaded from YAML with dotted command-line overrides.

    cfg = load_config("examples/tiny_cpu_copsd.yaml", ["optim.lr=1e-4", "train.steps=3"])

Every field has a docstring; `__post_init__` validates each section and raises `ValueError` naming the
dotted field. Megatron's and SGLang's arguments are *derived* from this tree, one function each, in
`megatron_copsd.derived_args`, so no foreign parser leaks into our namespace.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from megatron_copsd.rosd.config import RosdConfig


def _fail(path: str, msg: str) -> None:
    raise ValueError(f"config field {path}: {msg}")


def _check_choice(path: str, value, choices) -> None:
    if value not in choices:
        _fail(path, f"must be one of {list(choices)}, got {value!r}")


def _check_positive(path: str, value, *, allow_zero: bool = False) -> None:
    if value is None or (value < 0 if allow_zero else value <= 0):
        _fail(path, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass
class ModelConfig:
    hf_path: str = "tiny:qwen3"
    """HF model folder, or `tiny:<family>` (qwen3/llama/qwen2) to build a tiny random model on the fly
    (its tokenizer is trained on the run's training texts; see megatron_copsd.tiny_run)."""
    tokenizer_path: Optional[str] = None
    """Tokenizer folder/file; default: `hf_path`."""
    dtype: str = "auto"
    """Parameter dtype: `auto` (bf16 on GPU, fp32 on CPU), `bf16` or `fp32`."""
    tiny_overrides: dict = field(default_factory=dict)
    """Extra `tiny_hf_config` keyword arguments for `tiny:` models (hidden_size, num_layers, ...)."""

    def __post_init__(self) -> None:
        if not self.hf_path:
            _fail("model.hf_path", "must be set")
        _check_choice("model.dtype", self.dtype, ("auto", "bf16", "fp32"))
        if self.hf_path.startswith("tiny:"):
            _check_choice("model.hf_path", self.hf_path, ("tiny:qwen3", "tiny:llama", "tiny:qwen2"))


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size (data-parallel size = world_size / (tp * pp))."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state (fp32 main params, Adam moments) over data-parallel ranks (Megatron's
    distributed optimizer; `use_distributed_optimizer` of its OptimizerConfig and DDP config). On by default
    in the Qwen3 examples: it saves 12 bytes/param x (1 - 1/dp) per rank."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (TransformerConfig.sequence_parallel): norm / dropout activations are
    split along the sequence over the TP ranks. Needs tp > 1 (ignored with a warning at tp=1); sequence
    lengths are padded to a multiple of tp, and the response hidden states are gathered over TP before
    the loss."""
    recompute: str = "none"
    """Activation recomputation (TransformerConfig.recompute_granularity): `none`; `selective` recomputes
    the attention core (recompute_modules=[core_attn]: the [b, heads, s, s] scores of the non-TE attention
    are not kept for backward); `full` recomputes whole layers (recompute_method / recompute_num_layers)."""
    recompute_method: str = "uniform"
    """Full recompute only: `uniform` (every recompute_num_layers layers form one checkpoint) or `block`
    (the first recompute_num_layers layers of each pipeline stage are recomputed, the rest are not)."""
    recompute_num_layers: int = 1
    """Full recompute only: layers per checkpoint (uniform) or layers recomputed per stage (block)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass (DDP config
    overlap_grad_reduce; buckets are reduced as soon as their gradients are ready)."""
    overlap_param_gather: bool = False
    """Distributed optimizer: overlap the parameter all-gather after the optimizer step with the next
    forward (DDP config overlap_param_gather). The trainer still completes the gather right after the
    step, because the weight sync to the rollout engine and the EMA teacher read every weight then."""
    bucket_size: Optional[int] = None
    """DDP bucket size in parameters (DistributedDataParallelConfig.bucket_size); None: Megatron's
    default max(40M, 1M x dp) when overlapping, one bucket otherwise."""
    gradient_accumulation_fusion: bool = False
    """Fuse the weight-gradient GEMM with the accumulation into main_grad (TransformerConfig; needs
    Transformer Engine on a GPU, ignored with a warning otherwise)."""
    apply_rope_fusion: bool = False
    """Fused RoPE kernel (TransformerConfig; needs Transformer Engine on a GPU, ignored with a warning
    otherwise)."""
    backend: Optional[str] = None
    """torch.distributed backend; default gloo on CPU, nccl on GPU."""
    timeout_minutes: int = 30
    """Process-group timeout (the default group and Megatron's TP/PP/DP groups): a rank waiting longer in
    one collective aborts the job instead of hanging. Raise it when rank 0 generates long rollouts while
    the other ranks wait in the broadcast."""
    allow_cpu: bool = False
    """Train on CPU although the job was allocated GPUs (CUDA_VISIBLE_DEVICES / SLURM_*GPUS*) that this
    torch cannot use. Default: stop with an error (a CPU-only torch would otherwise silently run gloo)."""

    def __post_init__(self) -> None:
        _check_positive("parallel.tp", self.tp)
        _check_positive("parallel.pp", self.pp)
        _check_positive("parallel.timeout_minutes", self.timeout_minutes)
        _check_choice("parallel.recompute", self.recompute, ("none", "selective", "full"))
        _check_choice("parallel.recompute_method", self.recompute_method, ("uniform", "block"))
        _check_positive("parallel.recompute_num_layers", self.recompute_num_layers)
        if self.bucket_size is not None:
            _check_positive("parallel.bucket_size", self.bucket_size)
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            _fail("parallel.overlap_param_gather", "needs parallel.use_distributed_optimizer=true")
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            _fail("parallel.overlap_param_gather", "needs parallel.overlap_grad_reduce=true (Megatron requires both)")
        if self.sequence_parallel and self.tp == 1:
            import warnings

            warnings.warn("parallel.sequence_parallel ignored: it needs parallel.tp > 1")
            self.sequence_parallel = False
        if self.backend is not None:
            _check_choice("parallel.backend", self.backend, ("gloo", "nccl"))


@dataclass
class DataConfig:
    train_path: str = "fixture:tiny"
    """Training file in `data.format`, or `fixture:tiny` for the small generated arithmetic set (megatron_copsd.tiny_run)."""
    format: str = "copsd"
    """Layout of train/eval files: `copsd` (rows with problem, solution, problem_<lang>, answer; made by
    `copsd prepare-data`; eval may also be an AfriMGSM TSV), `sciknoweval` (MCQ rows with prompt, answer letter,
    system; the domain from the file name sciknoweval_<domain>_* or a `domain` field; prompts used as given)
    or `tooluse` (prompt + gold call list). Non-copsd formats ignore data.langs and need data.task mcq / tooluse."""
    eval_path: Optional[str] = None
    """Held-out examples for periodic eval: a COPSD-format file or an AfriMGSM TSV; `{lang}` in the path is
    replaced per language. Default: none (for `fixture:tiny`, a disjoint generated set)."""
    langs: list = field(default_factory=list)
    """Keep only these language codes (empty: all)."""
    task: str = "math"
    """Grader: math (last \\boxed{}), math_number (last \\boxed{}, else the last number: for small models that
    rarely box their answer), mcq or tooluse."""
    prompts_per_step: int = 4
    """Distinct prompts per optimizer step (each gets rollout.n samples)."""
    shuffle: bool = True
    """Shuffle the training order each epoch (seeded by train.seed and the epoch)."""
    max_prompt_tokens: int = 1024
    """Longer student or teacher prompts are dropped (with a warning counted in the metrics)."""
    include_problem_en: bool = True
    """COPSD teacher prompt carries the English problem."""
    include_reference_solution_en: bool = True
    """COPSD teacher prompt carries the English reference solution."""
    reasoning_prefix: bool = False
    """Open the assistant turn of the student, COPSD-teacher and eval prompts with the target language's
    reasoning prefix (the reference runs' `--student_enable_thinking`): `<think>` + newline + the prefix when
    the tokenizer knows `<think>` (Qwen3; rendered with enable_thinking=True), the bare prefix otherwise.
    Student and teacher carry the same prefix tokens, so they stay aligned on the response. Needs
    data.format copsd and a language with a reasoning prefix (see data.language_overrides)."""
    language_overrides: Optional[str] = None
    """YAML file of per-language strings (instruction, reasoning_prefix, ...) applied to the language
    registry at start-up; see megatron_copsd/data/languages.py for the format."""

    def __post_init__(self) -> None:
        if not self.train_path:
            _fail("data.train_path", "must be set")
        _check_choice("data.task", self.task, ("math", "math_number", "mcq", "tooluse"))
        _check_choice("data.format", self.format, ("copsd", "sciknoweval", "tooluse"))
        needed = {"sciknoweval": "mcq", "tooluse": "tooluse"}.get(self.format)
        if needed and self.task != needed:
            _fail("data.task", f"must be {needed} for data.format={self.format}, got {self.task!r}")
        if needed and self.train_path.startswith("fixture:"):
            _fail("data.train_path", f"fixtures are COPSD-format math; data.format={self.format} needs a file")
        _check_positive("data.prompts_per_step", self.prompts_per_step)
        _check_positive("data.max_prompt_tokens", self.max_prompt_tokens)
        if self.reasoning_prefix and self.format != "copsd":
            _fail("data.reasoning_prefix", f"needs data.format copsd (data.format={self.format} uses the "
                  "rows' own prompts)")
        if self.language_overrides is not None and not Path(self.language_overrides).is_file():
            _fail("data.language_overrides", f"file {self.language_overrides!r} does not exist")


@dataclass
class RolloutConfig:
    engine: str = "embedded"
    """`embedded` (HF model in the trainer's rank-0 process) or `sglang` (HTTP servers)."""
    n: int = 4
    """Samples per prompt (the GRPO group size)."""
    max_new_tokens: int = 256
    """Response length cap."""
    temperature: float = 1.0
    """Sampling temperature (the reference COPSD runs use 1.1)."""
    top_p: float = 1.0
    """Nucleus mass; 1.0 disables."""
    top_k: int = -1
    """Top-k; -1 disables."""
    max_batch_size: int = 32
    """Embedded engine: sequences decoded together."""
    sglang_urls: list = field(default_factory=list)
    """SGLang servers' base URLs when engine is `sglang` (the servers themselves: weight updates go to each;
    an sglang_router does not take them)."""
    sglang_router_url: Optional[str] = None
    """Optional sglang_router for generation requests; weight sync still talks to every `sglang_urls` server."""
    sglang_tp: int = 1
    """Tensor parallelism of each SGLang server (launch args); checked against each server's /server_info."""
    sglang_mem_fraction: float = 0.7
    """`--mem-fraction-static` for launched SGLang servers."""
    sglang_deterministic: bool = False
    """Launch the servers with `--enable-deterministic-inference` and send each row a `sampling_seed`
    derived from (train.seed, step, prompt, sample): reproducible rollouts, at some generation speed."""
    weight_sync: str = "disk"
    """How new weights reach SGLang: `disk` (HF checkpoint under train.output_dir/weight_sync, on a filesystem
    the servers share; for an 8B model a 16 GB write + read per step) or `nccl` (broadcast from the trainer's
    rank 0 to every server GPU in ~`weight_sync_bucket_mb` buckets; gloo when the trainer runs on CPU)."""
    weight_sync_master_address: Optional[str] = None
    """nccl: address at which the servers reach the trainer's rank 0; default: the IPv4 address of the
    interface in COPSD_SOCKET_IFNAME, else the host name's address (refused if loopback with remote servers)."""
    weight_sync_bucket_mb: int = 512
    """nccl: bucket size of one /update_weights_from_distributed call."""

    def __post_init__(self) -> None:
        _check_choice("rollout.engine", self.engine, ("embedded", "sglang"))
        _check_positive("rollout.n", self.n)
        _check_positive("rollout.max_new_tokens", self.max_new_tokens)
        _check_positive("rollout.temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            _fail("rollout.top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k == 0 or self.top_k < -1:
            _fail("rollout.top_k", f"must be -1 or >= 1, got {self.top_k!r}")
        _check_positive("rollout.max_batch_size", self.max_batch_size)
        if self.engine == "sglang" and not self.sglang_urls:
            if self.sglang_router_url:
                _fail("rollout.sglang_urls", "must list every SGLang server: weight sync cannot go through the "
                      "router (sglang_router proxies neither /pause_generation nor /update_weights_*)")
            _fail("rollout.sglang_urls", "must list at least one URL when rollout.engine is sglang")
        _check_choice("rollout.weight_sync", self.weight_sync, ("disk", "nccl"))
        ignored = [name for name, on in (("weight_sync", self.weight_sync != "disk"),
                                         ("sglang_deterministic", self.sglang_deterministic),
                                         ("sglang_router_url", bool(self.sglang_router_url))) if on]
        if self.engine == "embedded" and ignored:
            import warnings

            warnings.warn(f"rollout.{', rollout.'.join(ignored)} ignored (used with rollout.engine=sglang only)",
                          stacklevel=2)
        _check_positive("rollout.sglang_tp", self.sglang_tp)
        _check_positive("rollout.weight_sync_bucket_mb", self.weight_sync_bucket_mb)
        if not 0 < self.sglang_mem_fraction < 1:
            _fail("rollout.sglang_mem_fraction", f"must be in (0, 1), got {self.sglang_mem_fraction!r}")


@dataclass
class ObjectiveConfig:
    name: str = "copsd"
    """copsd (full-vocabulary divergence to the teacher), rosd (reflective, error-localized
    self-distillation; see the `rosd` section), sampled_kl (sampled-token reverse KL),
    grpo (clipped policy gradient) or sft (next-token cross-entropy on given texts)."""
    divergence: str = "auto"
    """forward_kl KL(p||q), reverse_kl KL(q||p) or jsd (generalised JSD); `auto` resolves to jsd for rosd
    (the paper's alpha = beta = 0.5) and to forward_kl otherwise."""
    beta: float = 0.5
    """JSD interpolation: M = beta*p + (1-beta)*q."""
    temperature: Union[Literal["auto"], float] = "auto"
    """Loss temperature tau applied to both student and teacher logits (copsd, rosd) and to both log-probs
    of the sampled-token objective (sampled_kl). `auto` (default): `rollout.temperature`, as the reference
    runs do (one temperature for sampling and for the loss; otherwise sampled_kl is off-policy); resolved
    when the config is built. A number overrides it, with a start-up warning when it differs."""
    token_clip: Optional[float] = None
    """Upper clamp c of the divergence (0.05 in the reference runs); None disables. How it applies: see
    token_clip_mode."""
    token_clip_mode: str = "entry"
    """entry (the COPSD reference's clip): every (position, vocabulary entry) term of the divergence is clamped
    at token_clip before the vocabulary sum, so only the clamped entries stop contributing gradient (negative
    terms are never clamped); position: the per-position divergence is clamped and a clipped position gives no
    gradient at all (our earlier behaviour). Applies to copsd and rosd, full-vocabulary and top-k losses."""
    teacher_top_k: Optional[int] = None
    """Restrict the divergence to the teacher's top-k tokens, renormalised (cheaper baseline, chunked torch)."""
    teacher: str = "fixed"
    """Teacher weights: fixed (frozen initial copy), ema (moving average of the student), dynamic (current)."""
    ema_decay: float = 0.999
    """EMA teacher decay per optimizer step."""
    offload_teacher: bool = False
    """Keep the fixed/EMA teacher's weights on CPU between uses (GPU only; ignored on CPU)."""
    clip_eps_low: float = 0.2
    """GRPO ratio clip: lower bound 1 - clip_eps_low."""
    clip_eps_high: float = 0.2
    """GRPO ratio clip: upper bound 1 + clip_eps_high."""
    std_normalize: bool = True
    """GRPO: divide group-centred rewards by the group std (+1e-6)."""
    kl_coef: float = 0.0
    """GRPO: weight of the k3 KL penalty to the reference (the fixed initial model); 0 disables."""
    tis_cap: Optional[float] = None
    """Truncated importance sampling cap C (grpo, rosd): per-token weight min(pi_train/pi_rollout, C),
    detached; None disables."""

    def __post_init__(self) -> None:
        _check_choice("objective.name", self.name, ("copsd", "rosd", "sampled_kl", "grpo", "sft"))
        if self.divergence == "auto":
            self.divergence = "jsd" if self.name == "rosd" else "forward_kl"
        _check_choice("objective.divergence", self.divergence, ("forward_kl", "reverse_kl", "jsd"))
        if not 0 <= self.beta <= 1:
            _fail("objective.beta", f"must be in [0, 1], got {self.beta!r}")
        if isinstance(self.temperature, str) and self.temperature != "auto":
            _fail("objective.temperature", f"must be `auto` or a number > 0, got {self.temperature!r}")
        if self.temperature != "auto":
            _check_positive("objective.temperature", self.temperature)
        if self.token_clip is not None:
            _check_positive("objective.token_clip", self.token_clip)
        _check_choice("objective.token_clip_mode", self.token_clip_mode, ("entry", "position"))
        if self.teacher_top_k is not None:
            _check_positive("objective.teacher_top_k", self.teacher_top_k)
        _check_choice("objective.teacher", self.teacher, ("fixed", "ema", "dynamic"))
        if not 0 < self.ema_decay < 1:
            _fail("objective.ema_decay", f"must be in (0, 1), got {self.ema_decay!r}")
        _check_positive("objective.clip_eps_low", self.clip_eps_low, allow_zero=True)
        _check_positive("objective.clip_eps_high", self.clip_eps_high, allow_zero=True)
        if self.clip_eps_low >= 1:
            _fail("objective.clip_eps_low", f"must be < 1, got {self.clip_eps_low!r}")
        _check_positive("objective.kl_coef", self.kl_coef, allow_zero=True)
        if self.tis_cap is not None:
            _check_positive("objective.tis_cap", self.tis_cap)


@dataclass
class OptimConfig:
    lr: float = 5e-6
    """Peak learning rate (AdamW)."""
    min_lr: float = 0.0
    """Floor of the decayed learning rate."""
    weight_decay: float = 0.01
    """Decoupled (AdamW) weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0.1 in the reference COPSD runs); 0 disables."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    decay_style: str = "constant"
    """LR decay after warm-up: constant, linear or cosine (over train.steps)."""

    def __post_init__(self) -> None:
        _check_positive("optim.lr", self.lr)
        _check_positive("optim.min_lr", self.min_lr, allow_zero=True)
        if self.min_lr > self.lr:
            _fail("optim.min_lr", f"must be <= optim.lr ({self.lr}), got {self.min_lr!r}")
        _check_positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                _fail(f"optim.{name}", f"must be in [0, 1), got {v!r}")
        _check_positive("optim.adam_eps", self.adam_eps)
        _check_positive("optim.clip_grad", self.clip_grad, allow_zero=True)
        _check_positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        _check_choice("optim.decay_style", self.decay_style, ("constant", "linear", "cosine"))


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps."""
    seed: int = 1234
    """Seeds data order, rollout sampling (per step: derived from (seed, step)) and model init RNG."""
    output_dir: str = "runs/copsd"
    """Run folder: metrics.jsonl, tensorboard/, checkpoints/, eval/, hf/."""
    micro_batch_tokens: int = 4096
    """Token budget of one micro-batch (student sequence lengths, padded); sequences are packed greedily."""
    max_nonfinite_in_a_row: int = 3
    """Stop the run after this many consecutive non-finite losses (each one skips its step)."""
    cpu_threads: int = 1
    """torch intra-op threads per process on CPU (ignored on GPU). 1 is the fast choice for tiny models and
    shared machines: with busy cores, multi-threaded small GEMMs were 10x slower in our measurements."""

    def __post_init__(self) -> None:
        _check_positive("train.steps", self.steps)
        _check_positive("train.micro_batch_tokens", self.micro_batch_tokens)
        _check_positive("train.max_nonfinite_in_a_row", self.max_nonfinite_in_a_row)
        _check_positive("train.cpu_threads", self.cpu_threads)
        if not self.output_dir:
            _fail("train.output_dir", "must be set")


@dataclass
class CheckpointConfig:
    save_every: int = 50
    """Save every N steps (0: only at the end and on preemption)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints."""
    resume: str = "auto"
    """`auto` (latest in <output_dir>/checkpoints), `none`, or a checkpoint folder path."""
    export_hf: bool = True
    """Write a Hugging Face checkpoint to <output_dir>/hf at the end."""
    async_save: bool = True
    """Write checkpoints in a background process (training continues; the next save or the exit waits for it)."""
    optimizer_sharding: str = "fully_reshardable"
    """Distributed-optimizer state format: `fully_reshardable` (gathered over DP per parameter; resumes on any
    TP / PP / DP layout) or `dp_reshardable` (no communication, fastest; resumes only with the same TP and PP)."""

    def __post_init__(self) -> None:
        _check_positive("checkpoint.save_every", self.save_every, allow_zero=True)
        _check_positive("checkpoint.keep_last", self.keep_last)
        _check_choice("checkpoint.optimizer_sharding", self.optimizer_sharding, ("fully_reshardable", "dp_reshardable"))
        if not self.resume:
            _fail("checkpoint.resume", "must be auto, none or a path")


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate every N steps and at the end (0: only at the end; -1: never)."""
    num_examples: int = 16
    """Held-out examples per eval."""
    num_samples: int = 4
    """Sampled generations per example (besides one greedy)."""
    temperature: float = 0.6
    """Sampling temperature for eval samples."""
    top_p: float = 0.95
    """Nucleus mass for eval samples."""
    max_new_tokens: int = 256
    """Response cap for eval generations."""

    def __post_init__(self) -> None:
        if self.every < -1:
            _fail("eval.every", f"must be -1, 0 or > 0, got {self.every!r}")
        _check_positive("eval.num_examples", self.num_examples)
        _check_positive("eval.num_samples", self.num_samples, allow_zero=True)
        _check_positive("eval.temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            _fail("eval.top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check_positive("eval.max_new_tokens", self.max_new_tokens)


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard scalars to <output_dir>/tensorboard."""
    wandb: bool = False
    """Log to Weights & Biases (needs `wandb` installed; fails early otherwise)."""
    wandb_project: str = "megatron-copsd"
    """W&B project name."""
    progress_bar: bool = True
    """tqdm bar on rank 0."""

    def __post_init__(self) -> None:
        if self.wandb:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                _fail("logging.wandb", "is true but the `wandb` package is not installed")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model (also the COPSD teacher)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Megatron parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training / eval examples and prompts."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of student responses."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Loss and teacher."""
    rosd: RosdConfig = field(default_factory=RosdConfig)
    """ROSD reflections, localization and loss variant (used when objective.name is rosd)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop length, seed, output folder, micro-batching."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, resuming and HF export."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic held-out evaluation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks."""

    def __post_init__(self) -> None:
        # Cross-section checks.
        if self.objective.name == "grpo" and self.rollout.n < 2:
            _fail("rollout.n", "GRPO needs at least 2 samples per prompt (group-normalised advantages)")
        if self.objective.teacher_top_k is not None and self.objective.name != "copsd":
            _fail("objective.teacher_top_k", "only applies to objective.name=copsd (rosd: rosd.loss=topk_tail)")
        if self.objective.temperature == "auto":
            self.objective.temperature = float(self.rollout.temperature)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def startup_warnings(cfg: Config) -> list[str]:
    """Settings worth a warning at start-up (the trainer prints them on rank 0)."""
    out = []
    o, r = cfg.objective, cfg.rollout
    if o.temperature != r.temperature:
        if o.name in ("copsd", "rosd", "sampled_kl"):
            what = ("the sampled-token objective is then off-policy (its log-probs are not the sampling "
                    "distribution's)" if o.name == "sampled_kl" else
                    "the reference code uses one temperature for sampling and for the loss")
            out.append(f"objective.temperature ({o.temperature:g}) differs from rollout.temperature "
                       f"({r.temperature:g}): the loss uses another temperature than the sampling; {what}. "
                       "Set objective.temperature: auto to use one temperature.")
        else:
            used = f"the rollout temperature {r.temperature:g}" if o.name == "grpo" else "temperature 1"
            out.append(f"objective.temperature ({o.temperature:g}) is ignored by objective.name={o.name} "
                       f"(it uses {used})")
    return out


# ---------------------------------------------------------------------------------------------
# YAML loading and dotted overrides


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Converts a YAML / command-line value to the annotated type (strings from the CLI included)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if len(args) < len(typing.get_args(tp)):
                return None
            _fail(path, f"must be set, got {value!r}")
        errors = []
        for arg in args:  # first member that accepts the value (e.g. Literal["auto"] before float)
            try:
                return _coerce(path, value, arg)
            except ValueError as e:
                errors.append(str(e).split(": ", 1)[-1])
        _fail(path, " or ".join(errors))
    if origin is Literal:
        if value not in typing.get_args(tp):
            _fail(path, f"must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        _fail(path, f"expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            _fail(path, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            _fail(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            _fail(path, f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            _fail(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            _fail(path, f"expected a string, got {value!r}")
        return str(value)
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if isinstance(value, str):
            import yaml

            value = yaml.safe_load(value) if value.strip() else base()
            if base is list and not isinstance(value, list):
                value = [value]
        if not isinstance(value, base):
            _fail(path, f"expected a {base.__name__}, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        _fail(prefix or "<root>", f"expected a mapping, got {data!r}")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ValueError(f"unknown config key(s) {[where + k for k in unknown]}; valid: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, path)
        else:
            kwargs[name] = _coerce(path, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node, cls = tree, Config
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            raise ValueError(f"unknown config key {key!r} ({'.'.join(parts[:i + 1])}); valid: {sorted(names)}")
        tp = _field_types(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ValueError(f"override {key!r} names a section; set one of its fields")
            node[part] = value  # coerced in _build against the annotation
            return
        if not dataclasses.is_dataclass(tp):
            raise ValueError(f"unknown config key {key!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = node.setdefault(part, {})
        if node is None:
            node = tree[part] = {}
        cls = tp


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value))
    return pairs


def config_from_dict(data: dict, overrides: list[str] = ()) -> Config:
    import copy

    tree = copy.deepcopy(data or {})
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads a YAML file (or only defaults when `path` is None) and applies `a.b=c` overrides."""
    data: dict = {}
    if path is not None:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} does not exist")
        with open(p) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(p)!r}: top level must be a mapping")
    return config_from_dict(data, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    import yaml

    tmp = Path(str(path) + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)
