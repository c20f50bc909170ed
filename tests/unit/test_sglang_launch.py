"""SGLang / router command lines (no sglang import; only the argv is checked)."""
from __future__ import annotations

import pytest

from megatron_copsd.rollout.launch import main, router_command, server_command


def test_server_command_flags():
    cmd = server_command("/ckpt", tp=4, dp=2, port=31000, mem_fraction=0.5, memory_saver=True, seed=7,
                         python="py")
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"]
    pairs = dict(zip(cmd[3::1], cmd[4::1]))
    assert pairs["--model-path"] == "/ckpt" and pairs["--tp-size"] == "4" and pairs["--dp-size"] == "2"
    assert pairs["--port"] == "31000" and pairs["--mem-fraction-static"] == "0.5"
    assert pairs["--random-seed"] == "7"
    assert "--enable-memory-saver" in cmd and "--skip-tokenizer-init" in cmd and "--nnodes" not in cmd
    multi = server_command("/ckpt", nnodes=2, node_rank=1, dist_init_addr="n0:5000")
    assert multi[-6:] == ["--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "n0:5000"]


@pytest.mark.parametrize("kwargs, msg", [
    (dict(tp=0), "tp and dp"), (dict(port=70000), "port"), (dict(mem_fraction=1.5), "mem_fraction"),
    (dict(nnodes=2), "dist_init_addr"), (dict(nnodes=2, node_rank=2, dist_init_addr="a:1"), "node_rank"),
])
def test_server_command_rejects_bad_values(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        server_command("/ckpt", **kwargs)


def test_router_command_and_main(capsys):
    cmd = router_command(port=30100, worker_urls=["http://a:1", "http://b:2"], python="py")
    assert cmd == ["py", "-m", "sglang_router.launch_router", "--host", "0.0.0.0", "--port", "30100",
                   "--worker-urls", "http://a:1", "http://b:2"]
    assert main(["server", "--model-path", "/m", "--tp", "2", "--shell"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("python -m sglang.launch_server --model-path /m --tp-size 2")


def test_server_command_rl_settings(capsys):
    """--weight-version 0 by default (SGLang would start at "default"), deterministic inference on request,
    and refusals for what breaks NCCL sync or the log-prob semantics."""
    cmd = server_command("/ckpt", python="py")
    assert cmd[cmd.index("--weight-version") + 1] == "0" and "--enable-deterministic-inference" not in cmd
    assert "--enable-deterministic-inference" in server_command("/ckpt", deterministic=True)
    assert "--weight-version" not in server_command("/ckpt", weight_version=None)
    assert "--dp-size" in server_command("/ckpt", dp=2, weight_sync="disk")
    with pytest.raises(ValueError, match=r"dp=2: NCCL weight sync needs one server per data-parallel replica"):
        server_command("/ckpt", dp=2, weight_sync="nccl")
    with pytest.raises(ValueError, match="rl-on-policy-target changes the returned log-probs"):
        server_command("/ckpt", extra_args=["--rl-on-policy-target", "fsdp"])
    assert main(["server", "--model-path", "/m", "--deterministic", "--weight-version", "3", "--shell"],
                environ={}) == 0
    line = capsys.readouterr().out
    assert "--weight-version 3" in line and "--enable-deterministic-inference" in line
    assert main(["server", "--model-path", "/m"], environ={"SGLANG_RETURN_ORIGINAL_LOGPROB": "true"}) == 2
    assert "SGLANG_RETURN_ORIGINAL_LOGPROB=true makes SGLang return unscaled log-probs" in capsys.readouterr().err
    assert main(["server", "--model-path", "/m", "--dp", "2", "--weight-sync", "nccl"], environ={}) == 2
    assert "NCCL weight sync needs one server per data-parallel replica" in capsys.readouterr().err
