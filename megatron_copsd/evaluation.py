"""Periodic held-out evaluation inside a training run (rollout rank only).

    paths = evaluate(engine, prepared_eval, tok, grader, eval_cfg, out_dir, step=10, seed=1234)

Per example one greedy generation and `num_samples` sampled ones (temperature/top_p from the eval
config); each is graded and written as a scored-generation record (`eval.metrics.ScoredGeneration`) to
`<out_dir>/generations.jsonl`; `eval.report.write_report` turns them into Markdown/CSV/PNG, and the
headline numbers (greedy accuracy, mean@k, format rate; accuracy and mean@k also per data domain) are
returned for the metrics log.
"""
from __future__ import annotations

from pathlib import Path

from megatron_copsd.rollout.types import SamplingParams


def evaluate(engine, prepared, tok, grader, eval_cfg, out_dir, *, step: int, seed: int, stop_token_ids=()) -> dict:
    from megatron_copsd.eval.metrics import ScoredGeneration, write_scored_generations
    from megatron_copsd.eval.report import write_report

    prepared = list(prepared)[: eval_cfg.num_examples]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = [p.student_ids for p in prepared]
    runs = [(True, SamplingParams(max_new_tokens=eval_cfg.max_new_tokens, temperature=0.0, n=1,
                                  stop_token_ids=tuple(stop_token_ids), seed=seed))]
    if eval_cfg.num_samples > 0:
        runs.append((False, SamplingParams(max_new_tokens=eval_cfg.max_new_tokens, temperature=eval_cfg.temperature,
                                           top_p=eval_cfg.top_p, n=eval_cfg.num_samples,
                                           stop_token_ids=tuple(stop_token_ids), seed=seed + step)))
    records = []
    for greedy, params in runs:
        for p, samples in zip(prepared, engine.generate(prompts, params)):
            for j, s in enumerate(samples):
                text = tok.decode(s.response_ids, skip_special_tokens=True)
                g = grader(text, p.example.answer)
                records.append(ScoredGeneration(
                    model=f"step_{step}", lang=p.example.lang, domain=p.example.domain, problem_id=str(p.example.id),
                    sample_idx=j, greedy=greedy, response=text, extracted=g.extracted, correct=bool(g.correct),
                    formatted=bool(g.formatted), num_tokens=len(s.response_ids)))
    write_scored_generations(records, out_dir / "generations.jsonl")
    paths = write_report(records, out_dir, title=f"Held-out evaluation at step {step}")
    greedy = [r for r in records if r.greedy]
    sampled = [r for r in records if not r.greedy]
    out = {
        "eval/greedy_accuracy": sum(r.correct for r in greedy) / max(1, len(greedy)),
        "eval/format_rate": sum(r.formatted for r in records) / max(1, len(records)),
        "eval/response_len": sum(r.num_tokens for r in records) / max(1, len(records)),
    }
    if sampled:
        out["eval/mean_at_k"] = sum(r.correct for r in sampled) / len(sampled)
    for dom in sorted({r.domain for r in records}):  # per domain, never merged (e.g. SciKnowEval subjects)
        g = [r for r in greedy if r.domain == dom]
        out[f"eval/greedy_accuracy/{dom}"] = sum(r.correct for r in g) / max(1, len(g))
        smp = [r for r in sampled if r.domain == dom]
        if smp:
            out[f"eval/mean_at_k/{dom}"] = sum(r.correct for r in smp) / len(smp)
    out["report"] = str(paths.get("markdown", paths.get("md", out_dir)))
    return out
