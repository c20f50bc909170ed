"""The training loop: rollout -> grade -> teacher scoring -> objective -> step -> sync -> log -> save/eval.

    result = Trainer(cfg).run()      # every rank; see megatron_copsd/train.py for the command line

One step: the rollout rank samples `rollout.n` responses for `data.prompts_per_step` prompts (seed
derived from (train.seed, step)), grades them and broadcasts them; every rank builds the aligned
student/teacher sequences, takes its data-parallel share, packs micro-batches by token budget, runs
the teacher (forward only) and the student (forward + backward) through Megatron's pipeline schedule,
steps the optimizer unless the loss is non-finite, syncs the new weights to the rollout engine, logs,
and checkpoints / evaluates on schedule. SIGUSR1 / SIGTERM finish the step, save and exit cleanly.
"""
from __future__ import annotations

import signal
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_copsd import experience as xp
from megatron_copsd.batching import TrainItem, collate, num_response_tokens, pack_microbatches, shard_for_dp
from megatron_copsd.checkpoint import state as ckpt
from megatron_copsd.config import Config, save_config, startup_warnings
from megatron_copsd.derived_args import resolve_dtype
from megatron_copsd.megatron.device import compute_device
from megatron_copsd.metrics_log import MetricsLogger
from megatron_copsd.rollout.types import SamplingParams
from megatron_copsd.train_step import METRIC_KEYS, ObjectiveSpec, student_pass, teacher_pass

ROLLOUT_RANK = 0


class NonFiniteLossError(RuntimeError):
    pass


class PhaseTimer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - t0


class Trainer:
    def __init__(self, cfg: Config) -> None:
        from megatron_copsd import run_setup
        from megatron_copsd.data.graders import get_grader
        from megatron_copsd.data.tokenizer import load_tokenizer
        from megatron_copsd.megatron.dist import init_distributed
        from megatron_copsd.megatron.model_provider import load_hf_config

        self.cfg = cfg
        self.info = init_distributed(cfg.parallel.tp, cfg.parallel.pp, backend=cfg.parallel.backend, seed=cfg.train.seed,
                                     timeout_minutes=cfg.parallel.timeout_minutes, allow_cpu=cfg.parallel.allow_cpu)
        self.rank = self.info.rank
        self.out = Path(cfg.train.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        # Early: the writer warms megatron-core's save machinery up in the background while the models load.
        self.ckpt_writer = ckpt.CheckpointWriter(self.ckpt_root, keep_last=cfg.checkpoint.keep_last,
                                                 async_save=cfg.checkpoint.async_save, on_complete=self._log_checkpoint)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        torch.manual_seed(cfg.train.seed)
        if cfg.data.language_overrides:
            from megatron_copsd.data.languages import load_language_overrides

            load_language_overrides(cfg.data.language_overrides)
        train_ex, eval_ex, self.hf_dir = _resolve_data_and_model(cfg, self.out, self.rank)
        self.tok = load_tokenizer(cfg.model.tokenizer_path or self.hf_dir)
        self.hf_config = load_hf_config(self.hf_dir)
        self.grader = get_grader(cfg.data.task)
        with_teacher = cfg.objective.name in ("copsd", "sampled_kl")
        if self.rank == 0:
            for msg in startup_warnings(cfg):
                warnings.warn(msg)
        prep = dict(include_problem_en=cfg.data.include_problem_en, max_prompt_tokens=cfg.data.max_prompt_tokens,
                    include_reference_solution_en=cfg.data.include_reference_solution_en, data_format=cfg.data.format,
                    reasoning_prefix=cfg.data.reasoning_prefix)
        self.train_set, self.dropped = xp.prepare_examples(train_ex, self.tok, with_teacher=with_teacher, **prep)
        self.eval_set, _ = xp.prepare_examples(eval_ex, self.tok, with_teacher=False, **prep)
        self.sampler = xp.PromptSampler(len(self.train_set), seed=cfg.train.seed, shuffle=cfg.data.shuffle)
        self.rosd = None
        if cfg.objective.name == "rosd":
            from megatron_copsd.rosd_step import RosdStep

            self.rosd = RosdStep(cfg.rosd, self.tok, seed=cfg.train.seed)
            if self.rank == 0:
                self.rosd.warn_at_startup(train_ex)

        dtype = resolve_dtype(cfg, torch.cuda.is_available())
        hf_state = run_setup.read_stage_weights(self.hf_dir, self.hf_config)  # once, for policy and teacher
        self.policy = run_setup.build_policy(cfg, hf_state, self.hf_config, dtype)
        self.teacher = run_setup.Teacher(teacher_mode(cfg), self.policy,
                                         lambda: run_setup.build_frozen_copy(cfg, hf_state, self.hf_config, dtype),
                                         decay=cfg.objective.ema_decay, offload=cfg.objective.offload_teacher)
        del hf_state
        self.spec = objective_spec(cfg, self.hf_config, self.teacher.separate_weights)
        self.engine = _build_engine(cfg, self.hf_dir, self.hf_config, self.tok, self.out) if self.rank == ROLLOUT_RANK else None
        self.step, self.nonfinite_total, self.nonfinite_in_a_row = 0, 0, 0
        self._preempt = threading.Event()
        self._resume()
        self.log = MetricsLogger(self.out, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                                 wandb_project=cfg.logging.wandb_project, progress_bar=cfg.logging.progress_bar,
                                 total_steps=cfg.train.steps, start_step=self.step, config=cfg.to_dict(),
                                 enabled=self.rank == 0)
        self.last_eval: dict = {}

    # ------------------------------------------------------------------------------------------ loop
    def run(self) -> dict:
        previous = self._install_signal_handlers()
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> dict:
        cfg = self.cfg
        for step in range(self.step, cfg.train.steps):
            t = PhaseTimer()
            t_step = time.perf_counter()
            with t("rollout"):
                batch, rollouts = self.rollout(step)
            with t("prepare"):
                items, stats = self.make_items(step, batch, rollouts)
                microbatches = self.microbatches(items)
            with t("teacher"):
                self.score_with_teacher(microbatches)
            with t("train"):
                train_metrics = self.train_step(microbatches, num_response_tokens(items))
            with t("sync"):
                self.sync_weights(version=step + 1)
            self.step = step + 1
            self.log_step(step, stats, train_metrics, t, time.perf_counter() - t_step, items)
            self.ckpt_writer.poll()  # finalises the previous asynchronous save once every rank wrote it
            if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
                self.save()
            if cfg.eval.every > 0 and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
                self.evaluate()
            if self.preempted():
                if not (cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0):
                    self.save()
                self.ckpt_writer.wait()
                self.log.message(f"preempted: checkpoint saved at step {self.step}")
                self.log.close()
                return {"rank": self.rank, "preempted": True, "step": self.step}
        return self.finish()

    # ------------------------------------------------------------------------------------------ phases
    def rollout(self, step: int):
        """Prompts from the sampler (identical on every rank) and their graded rollouts (from the rollout rank)."""
        batch = [self.train_set[i] for i in self.sampler.next_indices(self.cfg.data.prompts_per_step)]
        if self.cfg.objective.name == "sft":
            return batch, None
        rollouts = None
        if self.rank == ROLLOUT_RANK:
            r = self.cfg.rollout
            params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                    top_k=r.top_k, n=r.n, stop_token_ids=tuple(self.tok.stop_token_ids),
                                    seed=xp.step_seed(self.cfg.train.seed, step))
            rollouts = xp.generate_and_grade(self.engine, batch, params, self.grader, self.tok)
        return batch, xp.broadcast_object(rollouts, src=ROLLOUT_RANK)

    def make_items(self, step, batch, rollouts):
        if rollouts is None:
            return xp.sft_items(batch, self.tok), {}
        if self.rosd is not None:
            return self.rosd_items(step, batch, rollouts)
        return xp.make_train_items(batch, rollouts, objective=self.cfg.objective.name, n=self.cfg.rollout.n,
                                   std_normalize=self.cfg.objective.std_normalize)

    def rosd_items(self, step, batch, rollouts):
        """Reflections on the rollout rank (current weights), then the same items and stats on every rank."""
        out = None
        if self.rank == ROLLOUT_RANK:
            t0 = time.perf_counter()
            items, stats, summary = self.rosd.make_items(self.engine, batch, rollouts, step)
            out = (items, {**stats, "time/reflect": time.perf_counter() - t0}, summary)
        items, stats, summary = xp.broadcast_object(out, src=ROLLOUT_RANK)
        if self.cfg.rosd.log_group_decisions:
            self.log.message(summary)
        return items, stats

    def microbatches(self, items):
        """This DP rank's micro-batches, collated on the host (train_step moves each to the device when it
        runs). Under sequence parallelism lengths are padded to a multiple of TP."""
        pad = self.cfg.parallel.tp if self.cfg.parallel.sequence_parallel else 1
        shard = shard_for_dp(items, self.info.dp_rank, self.info.dp_size)
        if not shard and items:
            # Fewer sequences than DP ranks: this rank still has to join the gradient all-reduce, so it
            # runs one masked-out placeholder sequence (zero loss weight, zero gradient, zero tokens).
            mb = collate([TrainItem([self.tok.pad_token_id], [self.tok.pad_token_id], [self.tok.pad_token_id],
                                    index=-1)], pad_id=self.tok.pad_token_id, pad_multiple=pad)
            mb.mask.zero_()
            mb.has_rollout_logprobs = False
            return [mb]
        groups = pack_microbatches(shard, self.cfg.train.micro_batch_tokens)
        return [collate(g, pad_id=self.tok.pad_token_id, pad_multiple=pad) for g in groups]

    def score_with_teacher(self, microbatches) -> None:
        if self.spec.teacher_output is None or not microbatches:
            return
        model = self.teacher.acquire()
        teacher_pass(model, microbatches, self.spec)
        self.teacher.release()

    def train_step(self, microbatches, num_global_tokens: int) -> dict:
        """Forward/backward over this rank's micro-batches, global metric reduction, optimizer step."""
        policy = self.policy
        policy.model.zero_grad_buffer()
        policy.optimizer.zero_grad()
        totals = {k: 0.0 for k in METRIC_KEYS}
        if microbatches and num_global_tokens > 0:
            # Only the teacher's LM head is needed here (resident on the GPU even when the teacher is offloaded).
            totals = student_pass(policy.model, microbatches, self.spec, float(num_global_tokens),
                                  teacher_head=self.teacher.head_weight())
        m = _reduce_metrics(totals, self.info.tp_size)
        out = {"loss": m["loss"], "tokens": int(m["tokens"])}
        if num_global_tokens == 0:
            out["skipped"] = True  # every response was empty: nothing to learn from
            return out
        if not torch.isfinite(torch.tensor(m["loss"])):
            return self._skip_nonfinite(out, "loss")
        if not _grads_finite(policy.model):
            # A finite loss can still give inf/nan gradients (overflowing logits' backward, a bad kernel):
            # megatron-core only checks for that with an fp16 loss scaler, and clipping by a nan norm would
            # write nan into every weight.
            out["grad_norm"] = float("nan")
            return self._skip_nonfinite(out, "gradient")
        self.nonfinite_in_a_row = 0
        ok, grad_norm, _ = policy.optimizer.step()
        if self.cfg.parallel.overlap_param_gather:
            # The gather was deferred to the next forward; the weight sync and the EMA read every weight now.
            policy.model.start_param_sync(force_sync=True)
        if ok:
            policy.scheduler.step(increment=1)
            self.teacher.after_step()
        out.update(_derived_metrics(m, self.spec.name))
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        out["lr"] = float(policy.optimizer.param_groups[0]["lr"])
        out["skipped"] = not ok
        return out

    def _skip_nonfinite(self, out: dict, what: str) -> dict:
        """Skips the step (counted, logged as `nonfinite_skipped` / `skipped`); stops after N in a row.
        The decision is global (all-reduced loss / gradient check), so every rank raises together."""
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        out["skipped"] = True
        out["nonfinite"] = what
        if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_in_a_row:
            self.ckpt_writer.wait()  # the last good checkpoint is complete before the run stops
            raise NonFiniteLossError(
                f"{what} was non-finite in {self.nonfinite_in_a_row} consecutive steps (limit "
                f"train.max_nonfinite_in_a_row={self.cfg.train.max_nonfinite_in_a_row}); stopping. Try a lower "
                f"optim.lr, a token_clip, or check the data; last good checkpoint: {ckpt.latest_checkpoint(self.ckpt_root)}")
        return out

    def sync_weights(self, version: int) -> None:
        """Current policy weights -> rollout engine (HF names). Collective over the rollout rank's
        model-parallel group only: the other DP replicas hold identical weights."""
        from megatron_copsd.checkpoint.convert import gather_hf_state_dict

        if self.info.dp_rank != 0:
            return
        state = gather_hf_state_dict(self.policy.model, self.hf_config, only_first_rank=True)  # None off rank 0
        if self.engine is not None:
            self.engine.update_weights(state.items(), version)

    # ------------------------------------------------------------------------------------------ bookkeeping
    def log_step(self, step, stats, train_metrics, timer: PhaseTimer, seconds: float, items) -> None:
        with_teacher = self.spec.teacher_output is not None
        tokens = sum(it.student_len + (it.teacher_len if with_teacher else 0) for it in items)
        rec = {**stats, **train_metrics, **timer.times, "time/step": seconds,
               "tokens_per_s": tokens / max(seconds, 1e-9), "nonfinite_skipped": self.nonfinite_total,
               "dropped_prompts": self.dropped, "weight_version": step + 1}
        self.log.log(step + 1, rec)  # `step` in metrics.jsonl = optimizer steps completed (as step_N folders)

    def save(self) -> None:
        """Collective: one megatron-core distributed checkpoint of the whole training state (async when
        checkpoint.async_save: returns once the write started; the next save / exit waits for it)."""
        from megatron.core import tensor_parallel

        from megatron_copsd.checkpoint.training_state import sharded_training_state

        i = self.info
        common = {"step": self.step, "sampler": self.sampler.state_dict(),
                  "nonfinite": [self.nonfinite_total, self.nonfinite_in_a_row]}
        rng = {"rng": ckpt.capture_rng_state(), "mp_rng": tensor_parallel.get_cuda_rng_tracker().get_states(),
               "tp_rank": i.tp_rank, "pp_rank": i.pp_rank, "dp_rank": i.dp_rank}
        sharding = self.cfg.checkpoint.optimizer_sharding
        state = sharded_training_state(self.policy, self.teacher, common=common, optimizer_sharding=sharding)
        self.ckpt_writer.save(self.step, state, rng, meta={
            "tp": i.tp_size, "pp": i.pp_size, "dp": i.dp_size, "optimizer_sharding": sharding,
            "distributed_optimizer": self.cfg.parallel.use_distributed_optimizer})

    def _log_checkpoint(self, record: dict) -> None:
        """Rank 0, when a checkpoint is complete: its size, blocking time and write throughput, one JSON line
        per checkpoint in <output_dir>/checkpoints.jsonl (metrics.jsonl keeps one record per step)."""
        import json

        with open(self.out / "checkpoints.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if getattr(self, "log", None) is None:
            return
        self.log.message(f"checkpoint step_{record['step']}: {record['bytes'] / 1e6:.1f} MB in "
                         f"{record['write_s']:.2f} s ({record['mb_per_s']:.1f} MB/s), training blocked "
                         f"{record['blocking_s']:.2f} s")

    def _resume(self) -> None:
        """Restores the training state, resharding model and optimizer onto this run's TP / PP / DP layout.

        Exact on any layout: weights, fp32 main params, Adam moments and steps, LR schedule, data position,
        EMA teacher, counters (rollouts are seeded per (train.seed, step), so they continue too). RNG: each
        rank restores the generators saved by the same global rank (rank 0's when this run has more ranks);
        Megatron's model-parallel RNG tracker only when that rank had the same TP rank, else it keeps its
        fresh seed (it only drives dropout inside TP regions)."""
        from megatron.core import tensor_parallel

        from megatron_copsd.checkpoint.training_state import apply_training_state, sharded_training_state

        path = ckpt.resolve_resume(self.cfg.checkpoint.resume, self.ckpt_root)
        if path is None:
            return  # the engine was loaded from the same HF weights as the policy
        meta = ckpt.read_meta(path)
        i = self.info
        if meta.get("distributed_optimizer") != self.cfg.parallel.use_distributed_optimizer:
            raise ValueError(f"resume from {path}: saved with parallel.use_distributed_optimizer="
                             f"{meta.get('distributed_optimizer')}, this run has {self.cfg.parallel.use_distributed_optimizer}")
        sharding = meta.get("optimizer_sharding", "fully_reshardable")
        if (sharding == "dp_reshardable" and meta.get("distributed_optimizer")
                and (meta["tp"], meta["pp"]) != (i.tp_size, i.pp_size)):
            raise ValueError(f"resume from {path}: its optimizer state was saved dp_reshardable at tp={meta['tp']} "
                             f"pp={meta['pp']} and only loads with that TP/PP (this run: tp={i.tp_size} pp={i.pp_size}); "
                             "save with checkpoint.optimizer_sharding=fully_reshardable to change TP/PP")
        template = sharded_training_state(self.policy, self.teacher, common={}, is_loading=True,
                                          optimizer_sharding=sharding)
        common = apply_training_state(self.policy, self.teacher, ckpt.load_sharded(path, template))
        rng, same_rank = ckpt.load_rng(path, self.rank)
        ckpt.restore_rng_state(rng["rng"])
        same_layout = (meta["tp"], meta["pp"], meta["world_size"]) == (i.tp_size, i.pp_size, i.world_size)
        if same_rank and rng["tp_rank"] == i.tp_rank:
            tensor_parallel.get_cuda_rng_tracker().set_states(rng["mp_rng"])
        self.sampler.load_state_dict(common["sampler"])
        self.nonfinite_total, self.nonfinite_in_a_row = common["nonfinite"]
        self.step = common["step"]
        self.sync_weights(version=self.step)  # the engine must sample from the restored weights
        if self.rank == 0:
            layout = "" if same_layout else (f" (saved at tp={meta['tp']} pp={meta['pp']} world={meta['world_size']}, "
                                             f"resharded to tp={i.tp_size} pp={i.pp_size} world={i.world_size})")
            print(f"resumed from {path} at step {self.step}{layout}", flush=True)

    def evaluate(self) -> dict:
        from megatron_copsd.evaluation import evaluate

        result = {}
        if self.rank == ROLLOUT_RANK and self.eval_set and self.cfg.eval.every >= 0:
            result = evaluate(self.engine, self.eval_set, self.tok, self.grader, self.cfg.eval,
                              self.out / "eval" / f"step_{self.step}", step=self.step, seed=self.cfg.train.seed,
                              stop_token_ids=self.tok.stop_token_ids)
            self.log.log(self.step, {"eval": True, **result}, advance=False)
        if dist.is_initialized():
            dist.barrier()
        self.last_eval = result
        return result

    def finish(self) -> dict:
        from megatron_copsd.checkpoint.hf_export import export_hf_streaming

        cfg = self.cfg
        self.ckpt_writer.wait()
        last = ckpt.latest_checkpoint(self.ckpt_root)
        if last is None or ckpt.read_meta(last)["step"] != self.step:
            self.save()
            self.ckpt_writer.wait()
        hf_out = None
        if cfg.checkpoint.export_hf:
            hf_out = self.out / "hf"
            if self.info.dp_rank == 0:  # one replica; each stage streams its shards, nothing gathered whole
                export_hf_streaming(self.policy.model, self.hf_config, hf_out,
                                    tokenizer_dir=cfg.model.tokenizer_path or self.hf_dir)
        if cfg.eval.every >= 0:
            self.evaluate()
        if dist.is_initialized():
            dist.barrier()
        result = {"rank": self.rank, "step": self.step, "metrics": str(self.log.path), "checkpoint": str(ckpt.latest_checkpoint(self.ckpt_root)),
                  "hf": str(hf_out) if hf_out else None, "report": self.last_eval.get("report")}
        self.log.message("done: " + ", ".join(f"{k}={v}" for k, v in result.items() if k != "rank"))
        self.log.close()
        return result

    # ------------------------------------------------------------------------------------------ preemption
    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: self._preempt.set())
        return previous

    def preempted(self) -> bool:
        """True on every rank once any rank received SIGUSR1/SIGTERM (agreed with one all-reduce)."""
        flag = torch.tensor([1.0 if self._preempt.is_set() else 0.0], device=compute_device())  # NCCL: no host tensors
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ---------------------------------------------------------------------------------------------- helpers
def teacher_mode(cfg: Config) -> str:
    """The Teacher mode the objective needs (`dynamic` = the policy itself when no teacher is needed)."""
    needs_teacher = cfg.objective.name in ("copsd", "rosd", "sampled_kl") or cfg.objective.kl_coef > 0
    mode = cfg.objective.teacher if needs_teacher else "dynamic"
    if cfg.objective.name == "grpo" and cfg.objective.kl_coef > 0:
        mode = "fixed"  # the KL reference is the initial model
    return mode


def objective_spec(cfg: Config, hf_config, separate_teacher_weights: bool) -> ObjectiveSpec:
    o = cfg.objective
    return ObjectiveSpec(
        name=o.name, divergence=o.divergence, beta=o.beta, temperature=o.temperature, token_clip=o.token_clip,
        token_clip_mode=o.token_clip_mode, teacher_top_k=o.teacher_top_k, rollout_temperature=cfg.rollout.temperature,
        clip_eps_low=o.clip_eps_low, clip_eps_high=o.clip_eps_high, kl_coef=o.kl_coef, tis_cap=o.tis_cap,
        valid_vocab=hf_config.vocab_size, separate_teacher_weights=separate_teacher_weights,
        rosd_loss=cfg.rosd.loss, rosd_top_k=cfg.rosd.top_k)


def _reduce_metrics(totals: dict, tp_size: int) -> dict:
    """Sums over every rank; TP ranks of the last stage hold identical values, other stages zeros.
    `totals` may hold device tensors (student_pass) or floats: one all-reduce on the compute device and
    one host sync (`tolist`) per step."""
    device = compute_device()
    vec = torch.stack([torch.as_tensor(totals.get(k, 0.0), dtype=torch.float64, device=device).reshape(())
                       for k in METRIC_KEYS])
    if dist.is_initialized():
        dist.all_reduce(vec)
    vec /= tp_size
    return dict(zip(METRIC_KEYS, vec.tolist()))


def _grads_finite(ddp_model) -> bool:
    """True when every gradient in the DDP grad buffers of every rank is finite (one all-reduce). Checking
    the whole local buffer is exact with the distributed optimizer too: a non-finite local gradient makes
    the reduced sum non-finite."""
    buffers = list(getattr(ddp_model, "buffers", [])) + list(getattr(ddp_model, "expert_parallel_buffers", []))
    flags = [torch.isfinite(b.grad_data).all() for b in buffers]
    device = buffers[0].grad_data.device if buffers else torch.device("cpu")
    ok = torch.stack(flags).all().to(torch.float32) if flags else torch.ones((), device=device)
    ok = ok.reshape(1)
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _derived_metrics(m: dict, objective: str) -> dict:
    n = max(m["tokens"], 1.0)
    out = {}
    if objective in ("copsd", "rosd", "sampled_kl"):
        out["divergence"] = m["divergence_sum"] / n
    if objective in ("copsd", "rosd", "grpo"):
        out["clip_fraction"] = m["clipped_tokens"] / n  # copsd/rosd: positions with a clipped entry
    if objective in ("copsd", "rosd"):  # the token clip's share: of the (position, entry) terms, of the mass
        out["clip_entry_fraction"] = m["clipped_entry_frac_sum"] / n
        out["clip_mass"] = m["clipped_mass_sum"] / n
    if objective == "rosd":
        out["tis_weight_mean"] = m["tis_weight_sum"] / n
    if objective == "grpo":
        out["ratio_mean"] = m["ratio_sum"] / n
        out["kl"] = m["kl_sum"] / n
        out["tis_weight_mean"] = m["tis_weight_sum"] / n
    if objective == "sft":
        out["nll"] = m["nll_sum"] / n
    if m["gap_tokens"] > 0:
        out["logprob_gap"] = m["logprob_gap_sum"] / m["gap_tokens"]
        out["logprob_abs_gap"] = m["logprob_abs_gap_sum"] / m["gap_tokens"]
    return out


def _resolve_data_and_model(cfg: Config, out: Path, rank: int):
    """Loads train/eval examples; materialises the fixture and the tiny model on rank 0 when asked for."""
    from megatron_copsd import tiny_run

    langs = list(cfg.data.langs) or ["swa"]
    if cfg.data.format != "copsd":
        langs = ["eng"]  # SciKnowEval / ToolUse rows are English; data.langs does not apply
    train_path, eval_path = cfg.data.train_path, cfg.data.eval_path
    if train_path == "fixture:tiny":
        if rank == 0:
            tiny_run.write_fixture(out / "data", langs=langs, seed=cfg.train.seed)
        _barrier()
        train_path = str(out / "data" / "fixture_train.jsonl")
        eval_path = eval_path or str(out / "data" / "fixture_eval.jsonl")
    train = [ex for lang in langs for ex in _load_examples(train_path, lang, cfg.data.format)]
    evals = [ex for lang in langs for ex in _load_examples(eval_path, lang, cfg.data.format)] if eval_path else []
    hf_dir = cfg.model.hf_path
    if hf_dir.startswith("tiny:"):
        hf_dir = str(out / "tiny_model")
        if rank == 0:
            texts = tiny_run.tokenizer_texts(train + evals)
            if cfg.objective.name == "rosd":
                from megatron_copsd.rosd.prompts import prompt_wording

                texts += prompt_wording() * 4
            tiny_run.materialize_tiny_model(hf_dir, cfg.model.hf_path.split(":", 1)[1], texts, seed=cfg.train.seed,
                                            **cfg.model.tiny_overrides)
        _barrier()
    return train, evals, hf_dir


def _load_examples(path: str, lang: str, data_format: str):
    """Examples of one file in `data.format`: SciKnowEval MCQ (domain from the file name or rows), ToolUse,
    or COPSD -- for copsd also an AfriMGSM TSV (header with question, answer_number); `{lang}` in the path is
    replaced by the language code (AfriMGSM keeps one folder per language)."""
    from megatron_copsd.data.loaders import load_afrimgsm_tsv, load_copsd_training, load_sciknoweval, load_tooluse

    if data_format == "sciknoweval":
        return load_sciknoweval(path)
    if data_format == "tooluse":
        return load_tooluse(path)
    path = path.replace("{lang}", lang)
    if path.endswith(".tsv"):
        return load_afrimgsm_tsv(path, lang)
    return load_copsd_training(path, lang)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _build_engine(cfg: Config, hf_dir, hf_config, tok, out: Path):
    stops = tuple(dict.fromkeys(list(tok.stop_token_ids) + [tok.eos_token_id]))
    if cfg.rollout.engine == "sglang":
        from megatron_copsd.rollout.sglang_client import engine_from_config

        # rollout.weight_sync picks disk export or the NCCL broadcast group (rollout/sglang_weights.py).
        return engine_from_config(cfg, eos_token_ids=stops, hf_config=hf_config, work_dir=out)
    from megatron_copsd.rollout.embedded import EmbeddedEngine

    cuda = torch.cuda.is_available()
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    # Same precision as the policy (bf16 on GPU): the engine holds a full copy next to rank 0's shard.
    return EmbeddedEngine(str(hf_dir), eos_token_ids=stops, pad_token_id=tok.pad_token_id,
                          max_batch_size=cfg.rollout.max_batch_size, device=device, dtype=resolve_dtype(cfg, cuda))
