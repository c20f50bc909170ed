"""Turning rollouts into aligned student / teacher training sequences and token-budget micro-batches.

    items = [TrainItem(student_prompt, teacher_prompt, response, ...), ...]
    shard = shard_for_dp(items, dp_rank, dp_size)                 # balanced by tokens, deterministic
    micro = pack_microbatches(shard, token_budget=4096)            # list[list[TrainItem]]
    mb = collate(micro[0], pad_id=0)                               # tensors for one micro-batch

Alignment: a sequence is `prompt + response` (L response tokens). The hidden state at position
`len(prompt) - 1 + t` predicts response token t, so the response positions of the student sequence are
`[Ps - 1, Ps - 1 + L)` and of the teacher sequence `[Pt - 1, Pt - 1 + L)`; both gather L rows in the
same order, which is what makes the per-token divergence well defined. The final token of each
sequence is never an input that predicts anything, so it is dropped from the model input.

Micro-batches are padded rectangles `[b, s]`; packing is greedy in a deterministic order so that
`b * s <= token_budget` for the longer of the student and teacher sides (a single longer sequence
gets its own micro-batch). Right padding only: the model is causal, so pads never influence real
positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class TrainItem:
    """One rollout ready for training."""

    student_prompt: list[int]
    """Student prompt ids (ends with the opened assistant turn)."""
    teacher_prompt: list[int]
    """Teacher prompt ids (privileged context); equal to student_prompt for objectives without a teacher."""
    response: list[int]
    """Sampled response ids (including the stop token when one ended the sample)."""
    rollout_logprobs: list[float] = field(default_factory=list)
    """Rollout engine's log-probs of the response tokens (may be empty, e.g. for SFT)."""
    advantage: float = 0.0
    """GRPO advantage of this rollout (same for every token)."""
    index: int = 0
    """Position in the global batch (stable ordering / debugging)."""
    loss_mask: list[float] | None = None
    """Per response token: 1 = counts in the loss and the global token count, 0 = context only (ROSD
    distills a failed response from the localized error on). None: every token counts."""

    def __post_init__(self) -> None:
        if not self.response:
            raise ValueError(f"TrainItem {self.index}: empty response")
        if not self.student_prompt or not self.teacher_prompt:
            raise ValueError(f"TrainItem {self.index}: empty prompt")
        if self.rollout_logprobs and len(self.rollout_logprobs) != len(self.response):
            raise ValueError(f"TrainItem {self.index}: {len(self.rollout_logprobs)} log-probs for "
                             f"{len(self.response)} response tokens")
        if self.loss_mask is not None and len(self.loss_mask) != len(self.response):
            raise ValueError(f"TrainItem {self.index}: {len(self.loss_mask)} loss-mask entries for "
                             f"{len(self.response)} response tokens")

    @property
    def num_loss_tokens(self) -> float:
        return float(len(self.response)) if self.loss_mask is None else float(sum(self.loss_mask))

    @property
    def student_len(self) -> int:
        return len(self.student_prompt) + len(self.response) - 1

    @property
    def teacher_len(self) -> int:
        return len(self.teacher_prompt) + len(self.response) - 1

    @property
    def cost(self) -> int:
        return max(self.student_len, self.teacher_len)


@dataclass
class SideBatch:
    """Model inputs of one side (student or teacher) of a micro-batch."""

    tokens: torch.Tensor  # [b, s] int64
    position_ids: torch.Tensor  # [b, s] int64
    resp_batch_idx: torch.Tensor  # [T] row of each response position
    resp_pos_idx: torch.Tensor  # [T] column of each response position

    def to_(self, device: torch.device) -> "SideBatch":
        from megatron_copsd.megatron.device import to_compute_device

        for name in ("tokens", "position_ids", "resp_batch_idx", "resp_pos_idx"):
            setattr(self, name, to_compute_device(getattr(self, name), device))
        return self


@dataclass
class MicroBatch:
    student: SideBatch
    teacher: SideBatch
    targets: torch.Tensor  # [T] response token ids (global vocabulary ids)
    mask: torch.Tensor  # [T] float, 1 for tokens that count
    rollout_logprobs: torch.Tensor  # [T] float (zeros when unknown)
    advantages: torch.Tensor  # [T] float
    has_rollout_logprobs: bool
    num_tokens: int
    item_indices: list = field(default_factory=list)  # TrainItem.index of each row, in target order
    response_lens: list = field(default_factory=list)  # response length of each row

    def to_(self, device: torch.device) -> "MicroBatch":
        """Moves every tensor to `device` in place (pinned + non_blocking from the host to CUDA); no-op
        for tensors already there. Returns self."""
        from megatron_copsd.megatron.device import to_compute_device

        self.student.to_(device)
        if self.teacher is not self.student:
            self.teacher.to_(device)
        for name in ("targets", "mask", "rollout_logprobs", "advantages"):
            setattr(self, name, to_compute_device(getattr(self, name), device))
        return self


def num_response_tokens(items: Sequence[TrainItem]) -> int:
    """Tokens that count in the loss (the global-mean denominator): all response tokens unless masked."""
    return int(round(sum(it.num_loss_tokens for it in items)))


def shard_for_dp(items: Sequence[TrainItem], dp_rank: int, dp_size: int) -> list[TrainItem]:
    """Deterministic token-balanced split: longest first, each to the currently lightest rank."""
    if dp_size == 1:
        return list(items)
    loads = [0] * dp_size
    owner: dict[int, int] = {}
    order = sorted(range(len(items)), key=lambda i: (-items[i].cost, i))
    for i in order:
        r = min(range(dp_size), key=lambda k: (loads[k], k))
        owner[i] = r
        loads[r] += items[i].cost
    return [items[i] for i in range(len(items)) if owner[i] == dp_rank]


def pack_microbatches(items: Sequence[TrainItem], token_budget: int) -> list[list[TrainItem]]:
    """Greedy packing of items (sorted by length) into padded micro-batches of <= token_budget tokens."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(items, key=lambda it: (it.cost, it.index))
    out: list[list[TrainItem]] = []
    cur: list[TrainItem] = []
    for it in order:
        longest = max([it.cost] + [c.cost for c in cur])
        if cur and longest * (len(cur) + 1) > token_budget:
            out.append(cur)
            cur = []
        cur.append(it)
    if cur:
        out.append(cur)
    return out


def _side(prompts: list[list[int]], responses: list[list[int]], pad_id: int, pad_multiple: int = 1) -> SideBatch:
    seqs = [p + r[:-1] for p, r in zip(prompts, responses)]  # the last token predicts nothing
    s = -(-max(len(x) for x in seqs) // pad_multiple) * pad_multiple
    tokens = torch.full((len(seqs), s), pad_id, dtype=torch.long)
    for i, x in enumerate(seqs):
        tokens[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(len(seqs), s).contiguous()
    b_idx, p_idx = [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        b_idx += [i] * len(r)
        p_idx += list(range(len(p) - 1, len(p) - 1 + len(r)))
    return SideBatch(tokens, position_ids, torch.tensor(b_idx, dtype=torch.long), torch.tensor(p_idx, dtype=torch.long))


def collate(items: Sequence[TrainItem], *, pad_id: int, pad_multiple: int = 1) -> MicroBatch:
    """Tensors of one micro-batch (on the host). `pad_multiple`: sequence lengths are rounded up to a
    multiple of it (the TP size under sequence parallelism, which splits the sequence over TP ranks)."""
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    responses = [it.response for it in items]
    student = _side([it.student_prompt for it in items], responses, pad_id, pad_multiple)
    teacher = _side([it.teacher_prompt for it in items], responses, pad_id, pad_multiple)
    targets = torch.tensor([t for r in responses for t in r], dtype=torch.long)
    has_lp = all(len(it.rollout_logprobs) == len(it.response) for it in items)
    lps = [x for it in items for x in (it.rollout_logprobs if has_lp else [0.0] * len(it.response))]
    adv = [it.advantage for it in items for _ in it.response]
    return MicroBatch(
        student=student,
        teacher=teacher,
        targets=targets,
        mask=torch.tensor([m for it in items for m in (it.loss_mask if it.loss_mask is not None
                                                        else [1.0] * len(it.response))], dtype=torch.float32),
        rollout_logprobs=torch.tensor(lps, dtype=torch.float32),
        advantages=torch.tensor(adv, dtype=torch.float32),
        has_rollout_logprobs=has_lp,
        num_tokens=len(targets),
        item_indices=[it.index for it in items],
        response_lens=[len(r) for r in responses],
    )


def gather_response_hidden(hidden_sbh: torch.Tensor, side: SideBatch) -> torch.Tensor:
    """[s, b, h] model output -> [T, h] rows at the response positions (differentiable)."""
    return hidden_sbh[side.resp_pos_idx, side.resp_batch_idx]


def max_seq_len(microbatches: Sequence[MicroBatch], which: str) -> int:
    return max((getattr(mb, which).tokens.shape[1] for mb in microbatches), default=1)

