"""Benchmark the fused divergence kernels (thin wrapper around `copsd bench-kernels`).

    python tools/bench_kernels.py --mode cpu --out-dir bench_out
    python tools/bench_kernels.py --mode gpu --impls fused,naive,liger --repeat 20
"""
import sys

from copsd_kernels.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
