"""The one-CPU crosslingual benchmark: synthetic problems, languages, a tiny base model, COPSD vs GRPO.

Run it with `copsd synth-bench --mode quick --out DIR` (see `megatron_copsd.synthetic.run`).
"""
