"""slurm/README.md, the train.sbatch header and the scripts' code agree on the knobs' defaults and wiring.

Defaults are read from the code (`${COPSD_X:-default}` in slurm/*.sh, *.sbatch), from the header comment of
train.sbatch (`#   COPSD_X ... (default D)`) and from the README (`` `COPSD_X` (default D) ``). Text only:
whether the scripts run is tested in tests/e2e/test_slurm.py.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
SCRIPTS = sorted([*SLURM.glob("*.sh"), *SLURM.glob("*.sbatch")])


def _code_defaults() -> dict[str, set[str]]:
    found = defaultdict(set)
    for script in SCRIPTS:
        for name, default in re.findall(r"\$\{(COPSD_\w+):-([^}]*)\}", script.read_text()):
            if re.fullmatch(r"[\w.]+", default):  # literal defaults only (not ${OTHER} or $PWD/...)
                found[name].add(default)
    return found


def _header_defaults() -> dict[str, str]:
    header = [line for line in (SLURM / "train.sbatch").read_text().splitlines() if line.startswith("#")]
    out = {}
    for line in header:
        m = re.match(r"#\s+(COPSD_\w+)\S*\s.*\(default ([^)]+)\)", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _readme_defaults(text: str) -> dict[str, set[str]]:
    out = defaultdict(set)
    for name, default in re.findall(r"`(COPSD_\w+)(?:=\w+)?`\s*\(default ([^);]+)[);]", text):
        out[name].add(default.strip().strip("`"))
    return out


def test_defaults_agree_between_code_header_and_readme():
    code = _code_defaults()
    assert {"COPSD_SGLANG_PORT", "COPSD_ROUTER_PORT", "COPSD_GPUS_PER_NODE", "COPSD_SGLANG_NODES"} <= set(code)
    conflicting = {k: v for k, v in code.items() if len(v) > 1}
    assert not conflicting, f"scripts disagree on defaults: {conflicting}"
    code = {k: v.pop() for k, v in code.items()}
    header = _header_defaults()
    assert len(header) >= 5, header
    assert {k: v for k, v in header.items() if k in code} == {k: code[k] for k in header if k in code}
    assert set(header) <= set(code), f"header documents defaults of knobs the code lacks: {set(header) - set(code)}"
    readme = _readme_defaults((SLURM / "README.md").read_text())
    missing = set(header) - set(readme)
    assert not missing, f"train.sbatch documents defaults that slurm/README.md does not: {sorted(missing)}"
    for name, values in readme.items():
        if name in code:
            assert values == {code[name]}, f"README says {name} defaults to {values}, the scripts use {code[name]}"


def test_readme_mentions_only_existing_knobs_and_the_real_wiring():
    readme = (SLURM / "README.md").read_text()
    known = set()
    for path in [*SCRIPTS, *REPO.glob("megatron_copsd/**/*.py")]:
        known |= set(re.findall(r"COPSD_\w+", path.read_text()))
    stale = set(re.findall(r"COPSD_\w+", readme)) - known
    assert not stale, f"slurm/README.md mentions knobs no script reads: {sorted(stale)}"
    sbatch = (SLURM / "train.sbatch").read_text()
    # The trainer gets every server (not the router), in both texts.
    assert '"rollout.sglang_urls=[' in sbatch and "rollout.sglang_urls=[" in readme
    assert "sglang_urls=http://<router>" not in readme and "talks to the servers directly" in readme
    assert "the trainer talks to the servers directly" in sbatch
    # Weight sync modes are documented where they are read.
    for text in (sbatch, readme):
        assert "rollout.weight_sync=nccl" in text or "`nccl`" in text
        assert "COPSD_SOCKET_IFNAME" in text
