"""In-process rollout engine: continuous-batching decode over a static KV cache (CPU or GPU).

The default engine on one machine. The trainer builds it from the same weights as its Megatron model
and keeps it in sync with `update_weights(named_tensors_in_hf_names, version)` (in memory, no disk).

Decode loop (our own, not `transformers.generate`), for Llama / Qwen2 / Qwen3 models (`decoder.py`):
- prompts (x `n` samples) are queued longest first; up to `max_batch_size` sequences decode together in
  the slots of a preallocated KV cache ([slots, kv_heads, longest prompt + max_new_tokens, head_dim] per
  layer), each sequence from column 0 (no left padding; its positions are 0..len-1, what transformers'
  position ids give a left-padded row);
- admission: pending prompts are prefilled together (right-padded, causal) into free slots, as soon as a
  quarter of the slots (or all the pending prompts) fit, so finished rows are refilled from the queue
  while the others keep decoding; active sequences always occupy a dense prefix of the slots (finished
  ones are replaced by moving the last ones into their place), so a step costs what its live rows cost;
- each step is one forward of one token per live row over the model's own parameters:
  `scaled_dot_product_attention` on the cache columns the rows have filled (mask: column <= position),
  no cache growth by concatenation, no per-layer mask building;
- a row that emits a stop token (EOS or `stop_token_ids`) or reaches `max_new_tokens` leaves at once;
- logits are cut to `valid_vocab` (Megatron pads the vocabulary) and handled in fp32.
Other architectures (or `static_cache=False`) take the reference path: the HF model's own forward with a
`DynamicCache`, prompts cut into left-padded chunks of `max_batch_size` rows, finished rows dropped.

Log-probs follow `types.py`: `log_softmax(logits / T)[token]` over the valid vocabulary before top-k /
top-p; for greedy decoding (T = 0) T = 1 is used (raw logits).

Randomness: sample j of prompt i draws from its own `torch.Generator` seeded by `derive_seed(seed, i, j)`;
one uniform per step is turned into a token by inverse-CDF over the filtered distribution. So the random
stream of a sample does not depend on batch size, admission order, slot or which other rows are present.
Guaranteed: the same (weights, prompts, params incl. seed, max_batch_size, device) give identical
outputs (fp32, fixed order). Across different batch compositions the logits of a row can differ in the
last ulp (different matmul shapes), which flips a token only at a near-tie; in tests the samples are
identical. `seed=None` draws a fresh base seed (recorded in `Sample.meta["seed"]`).
"""
from __future__ import annotations

import hashlib
import secrets
from collections import deque
from dataclasses import dataclass, field
import time
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch

from megatron_copsd.rollout.decoder import KVCache, StaticCacheDecoder, unsupported_reason
from megatron_copsd.rollout.types import Sample, SamplingParams


def derive_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for sample `sample_index` of prompt `prompt_index`, well mixed from the base seed."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def filter_logits(scaled_logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Masks (to -inf) tokens outside the top-k / top-p set of each row. `scaled_logits`: [B, V] fp32.

    top-k keeps ties with the k-th value; top-p keeps the smallest prefix of the (stably) sorted
    distribution whose mass reaches `top_p`, always at least the most likely token.
    """
    out = scaled_logits
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[:, -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        probs = torch.softmax(out, dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_from_uniforms(filtered_logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row b picks the token whose CDF interval contains `uniforms[b]` in [0, 1).

    fp64 cumulative sums in vocabulary order; a token with probability 0 has an empty interval and can
    never be picked. Returns [B] int64.
    """
    probs = torch.softmax(filtered_logits.double(), dim=-1)  # [B, V]
    cdf = torch.cumsum(probs, dim=-1)
    target = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


@dataclass
class _Seq:
    """One (prompt, sample) row in flight in the continuous loop."""

    prompt_index: int
    sample_index: int
    prompt: list[int]
    seed: int
    gen: torch.Generator
    t0: float
    cached: int = 0
    """Tokens in this row's cache slot; the next input token goes to this column."""
    response: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str = "length"


class EmbeddedEngine:
    """Batched generation on an HF causal LM held in this process. See the module docstring."""

    def __init__(
        self,
        model_or_hf_dir,
        *,
        eos_token_ids: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        max_batch_size: int = 32,
        device: str | torch.device = "cpu",
        valid_vocab: int | None = None,
        dtype: torch.dtype = torch.float32,
        weight_version: int = 0,
        static_cache: bool = True,
        packed_weights: bool | None = None,
    ) -> None:
        """`model_or_hf_dir`: a transformers causal LM (the engine takes it over: moved to `device` and
        `dtype`, set to eval) or an HF checkpoint folder. `eos_token_ids` / `pad_token_id` default to
        the model config's. `valid_vocab`: the tokenizer's vocabulary size when the model's logits are
        wider (padded rows are never sampled and are excluded from log-probs). `max_batch_size`: slots
        of the KV cache (sequences decoded together). `static_cache=False` forces the reference path
        (the HF model's forward each step). `packed_weights`: the decode step reads blocked copies of the
        linear weights (`decoder.PackedLinear`; faster on CPU, one more copy of those weights in memory,
        rebuilt after `update_weights`); default on for CPU, off elsewhere."""
        if isinstance(model_or_hf_dir, (str, Path)):
            import transformers

            path = Path(model_or_hf_dir)
            if not (path / "config.json").is_file():
                raise ValueError(f"model_or_hf_dir: no config.json in {path}")
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        else:
            model = model_or_hf_dir
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        cfg = self.model.config
        if eos_token_ids is None:
            eos_token_ids = cfg.eos_token_id
        if eos_token_ids is None:
            raise ValueError("eos_token_ids: not given and the model config has no eos_token_id")
        self.eos_token_ids = (
            (int(eos_token_ids),) if isinstance(eos_token_ids, int) else tuple(int(t) for t in eos_token_ids)
        )
        if pad_token_id is None:
            pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else self.eos_token_ids[0]
        self.pad_token_id = int(pad_token_id)
        logits_width = self.model.get_output_embeddings().weight.shape[0]
        self.valid_vocab = logits_width if valid_vocab is None else int(valid_vocab)
        if not 0 < self.valid_vocab <= logits_width:
            raise ValueError(f"valid_vocab must be in [1, {logits_width}] (logits width), got {valid_vocab}")
        self.max_batch_size = int(max_batch_size)
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self._weight_version = int(weight_version)
        self.decoder: StaticCacheDecoder | None = None
        if static_cache:
            reason = unsupported_reason(self.model)
            if reason is None:
                self.decoder = StaticCacheDecoder(self.model, packed=packed_weights)
            else:
                warnings.warn(f"EmbeddedEngine: static-cache decoder unsupported ({reason}); using the slower "
                              "reference path (the HF model's forward per step)", stacklevel=2)

    # ------------------------------------------------------------------ protocol
    @property
    def weight_version(self) -> int:
        return self._weight_version

    def health(self) -> bool:
        return True

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Sample]]:
        """Per prompt, `params.n` complete samples (see the module docstring for the guarantees)."""
        prompts = [self._check_prompt(i, p, params) for i, p in enumerate(prompts)]
        base_seed = params.seed if params.seed is not None else secrets.randbits(62)
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        # Longest first: rows of similar length share a chunk, which keeps padding small.
        rows.sort(key=lambda r: (-len(prompts[r[0]]), r))
        out: list[list[Sample | None]] = [[None] * params.n for _ in prompts]
        if self.decoder is not None:
            for sample in self._generate_continuous(prompts, rows, params, base_seed):
                out[sample.prompt_index][sample.meta["sample_index"]] = sample
        else:
            for start in range(0, len(rows), self.max_batch_size):
                chunk = rows[start : start + self.max_batch_size]
                for (i, j), sample in zip(chunk, self._generate_chunk(prompts, chunk, params, base_seed)):
                    out[i][j] = sample
        assert all(s is not None for per in out for s in per)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copies HF-named tensors into the model; strict: every name known, every shape equal, every
        parameter covered (tied aliases count once). Nothing is copied unless all checks pass."""
        state = self.model.state_dict(keep_vars=True)
        incoming: dict[str, torch.Tensor] = {}
        for name, tensor in named_tensors:
            if name not in state:
                raise ValueError(f"update_weights: unknown parameter name {name!r}")
            if tuple(tensor.shape) != tuple(state[name].shape):
                raise ValueError(
                    f"update_weights: shape of {name!r} is {tuple(tensor.shape)}, "
                    f"model expects {tuple(state[name].shape)}"
                )
            incoming[name] = tensor
        # Group names that alias one storage (tied embeddings); each group needs one tensor.
        groups: dict[int, list[str]] = {}
        for name, _ in self.model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(state[name]) if name in state else id(name), []).append(name)
        missing = [names[0] for names in groups.values() if not any(n in incoming for n in names)]
        if missing:
            raise ValueError(f"update_weights: missing {len(missing)} parameters, e.g. {missing[:3]}")
        for name, tensor in incoming.items():
            # copy_ on the parameter itself (not .data) moves its version counter, which the decoder's
            # packed copies are keyed on; invalidate them explicitly as well.
            state[name].copy_(tensor.to(device=self.device, dtype=state[name].dtype))
        if self.decoder is not None:
            self.decoder.invalidate_packed()
        self._weight_version = int(version)

    # ------------------------------------------------------------------ internals
    def _check_prompt(self, index: int, prompt: Sequence[int], params: SamplingParams) -> list[int]:
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        bad = [t for t in ids if not 0 <= t < self.valid_vocab]
        if bad:
            raise ValueError(f"prompt {index} has token ids outside [0, {self.valid_vocab}): {bad[:5]}")
        if self.max_positions is not None and len(ids) + params.max_new_tokens > self.max_positions:
            raise ValueError(
                f"prompt {index}: {len(ids)} tokens + max_new_tokens {params.max_new_tokens} exceed the "
                f"model's max_position_embeddings {self.max_positions}"
            )
        return ids

    def _pick(self, logits: torch.Tensor, params: SamplingParams, gens: list[torch.Generator]):
        """Next token and its log-prob for each row. `logits`: [B, V_valid] fp32."""
        if params.temperature == 0:
            tokens = torch.argmax(logits, dim=-1)
            logprobs = torch.log_softmax(logits, dim=-1)
        else:
            scaled = logits / params.temperature
            logprobs = torch.log_softmax(scaled, dim=-1)
            filtered = filter_logits(scaled, params.top_k, params.top_p)
            # One fp64 uniform per row from that row's own generator (CPU, so device-independent).
            uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])
            tokens = sample_from_uniforms(filtered, uniforms.to(logits.device))
        return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def _forward(self, ids, mask, pos, cache) -> torch.Tensor:
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        return out.logits[:, -1, : self.valid_vocab].float()

    @torch.inference_mode()
    def _generate_continuous(self, prompts, rows, params: SamplingParams, base_seed: int) -> list[Sample]:
        """The static-cache loop of the module docstring; `rows` (prompt, sample) in admission order."""
        if params.max_new_tokens == 0 or not rows:
            return self._samples(rows, [[] for _ in rows], [[] for _ in rows], ["length"] * len(rows),
                                 [derive_seed(base_seed, i, j) for i, j in rows], time.perf_counter())
        dec = self.decoder
        dec.sync_packed()  # the weights may have changed since the last call
        slots = min(self.max_batch_size, len(rows))
        cache = dec.new_cache(slots, max(len(prompts[i]) for i, _ in rows) + params.max_new_tokens)
        stop_ids = set(self.eos_token_ids) | set(params.stop_token_ids)
        pending = deque(rows)
        live: list[_Seq] = []  # slot b holds live[b]; live rows are always slots [0, len(live))
        cur = torch.zeros(slots, dtype=torch.long, device=self.device)  # next input token of each slot
        pos = torch.zeros(slots, dtype=torch.long, device=self.device)  # its column (== _Seq.cached)
        # Prefill reads every weight once, like a decode step: batch admissions, but never leave more
        # than a quarter of the slots idle while prompts wait.
        min_admit = max(1, slots // 4)
        samples: list[Sample] = []
        while pending or live:
            free = slots - len(live)
            if pending and free >= min(len(pending), min_admit):
                new = [self._new_seq(prompts, i, j, base_seed) for i, j in
                       (pending.popleft() for _ in range(min(free, len(pending))))]
                first = len(live)
                logits = self._prefill(cache, first, new)
                live.extend(new)
                batch = slice(first, len(live))
                pos[batch] = torch.tensor([s.cached for s in new], device=self.device)
            else:
                n = len(live)
                width = max(s.cached for s in live) + 1
                logits = dec.decode(cache, cur[:n], pos[:n], width)[:, : self.valid_vocab].float()
                for s in live:
                    s.cached += 1
                pos[:n] += 1
                batch = slice(0, n)
            rows_now = live[batch]
            tokens, token_logprobs = self._pick(logits, params, [s.gen for s in rows_now])
            cur[batch] = tokens
            finished = []
            for b, (s, tok, lp) in enumerate(zip(rows_now, tokens.tolist(), token_logprobs.tolist()),
                                             start=batch.start):
                s.response.append(tok)
                s.logprobs.append(lp)
                if tok in stop_ids:
                    s.finish = "stop"
                    finished.append(b)
                elif len(s.response) >= params.max_new_tokens:
                    finished.append(b)
            if finished:
                samples += [self._sample_of(live[b]) for b in finished]
                self._compact(live, finished, cache, cur, pos)
        return samples

    def _new_seq(self, prompts, i: int, j: int, base_seed: int) -> _Seq:
        seed = derive_seed(base_seed, i, j)
        return _Seq(i, j, prompts[i], seed, torch.Generator(device="cpu").manual_seed(seed), time.perf_counter())

    def _prefill(self, cache: KVCache, first: int, new: list[_Seq]) -> torch.Tensor:
        """Prompts of `new` into slots [first, first + len(new)); logits of their last tokens, fp32."""
        for s in new:
            s.cached = len(s.prompt)
        logits = self.decoder.prefill(cache, first, [s.prompt for s in new])
        return logits[:, : self.valid_vocab].float()

    @staticmethod
    def _compact(live: list[_Seq], finished: list[int], cache: KVCache, cur, pos) -> None:
        """Removes finished slots, moving the last live rows into their places (cache, inputs, state)."""
        gone = set(finished)
        keep = len(live) - len(gone)
        holes = [b for b in finished if b < keep]
        movers = [b for b in range(keep, len(live)) if b not in gone]
        if movers:
            cache.move(movers, holes, upto=max(live[b].cached for b in movers))
            src = torch.tensor(movers, device=cur.device)
            dst = torch.tensor(holes, device=cur.device)
            cur[dst] = cur[src]
            pos[dst] = pos[src]
            for h, m in zip(holes, movers):
                live[h] = live[m]
        del live[keep:]

    def _sample_of(self, s: _Seq) -> Sample:
        return Sample(prompt_index=s.prompt_index, response_ids=s.response, logprobs=s.logprobs,
                      finish_reason=s.finish, weight_version=self._weight_version,
                      meta={"seed": s.seed, "sample_index": s.sample_index,
                            "latency_s": time.perf_counter() - s.t0})

    @torch.inference_mode()
    def _generate_chunk(self, prompts, rows, params: SamplingParams, base_seed: int) -> list[Sample]:
        from transformers import DynamicCache

        t0 = time.perf_counter()
        num_rows = len(rows)
        seeds = [derive_seed(base_seed, i, j) for i, j in rows]
        responses: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        finish = ["length"] * num_rows
        if params.max_new_tokens == 0:
            return self._samples(rows, responses, logprobs, finish, seeds, t0)

        stop_ids = set(self.eos_token_ids) | set(params.stop_token_ids)
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        lengths = [len(prompts[i]) for i, _ in rows]
        width = max(lengths)
        ids = torch.full((num_rows, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((num_rows, width), dtype=torch.long)
        for r, (i, _) in enumerate(rows):
            ids[r, width - lengths[r] :] = torch.tensor(prompts[i], dtype=torch.long)
            mask[r, width - lengths[r] :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        next_pos = pos[:, -1] + 1  # [B_active]
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, pos, cache)
        active = list(range(num_rows))  # chunk row of each batch row still decoding
        for step in range(params.max_new_tokens):
            tokens, token_logprobs = self._pick(logits, params, [gens[r] for r in active])
            keep: list[int] = []
            for b, (tok, lp) in enumerate(zip(tokens.tolist(), token_logprobs.tolist())):
                r = active[b]
                responses[r].append(tok)
                logprobs[r].append(lp)
                if tok in stop_ids:
                    finish[r] = "stop"
                elif step + 1 < params.max_new_tokens:
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(active):
                # Drop finished rows from the batch and from every layer's KV cache.
                sel = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(sel)
                mask, next_pos, tokens = mask[sel], next_pos[sel], tokens[sel]
                active = [active[b] for b in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            logits = self._forward(tokens.unsqueeze(-1), mask, next_pos.unsqueeze(-1), cache)
            next_pos = next_pos + 1
        return self._samples(rows, responses, logprobs, finish, seeds, t0)

    def _samples(self, rows, responses, logprobs, finish, seeds, t0) -> list[Sample]:
        latency = time.perf_counter() - t0
        return [
            Sample(
                prompt_index=i,
                response_ids=responses[r],
                logprobs=logprobs[r],
                finish_reason=finish[r],
                weight_version=self._weight_version,
                meta={"seed": seeds[r], "sample_index": j, "latency_s": latency},
            )
            for r, (i, j) in enumerate(rows)
        ]

