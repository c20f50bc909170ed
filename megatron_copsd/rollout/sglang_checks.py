"""Start-up checks of SGLang servers (0.5.23 HTTP API, docs/sglang_api.md) and of the weight-sync address.

`read_server_facts` asks each server `GET /model_info` (required: `weight_version`) and `GET /server_info`
(the launch arguments: `tp_size`, `dp_size`, `pp_size`, `enable_deterministic_inference`,
`rl_on_policy_target`). `check_servers` turns them into clear refusals before the first rollout:

- log-prob semantics: the trainer assumes `log_softmax(logits / T)` before top-k/top-p (rollout/types.py).
  `--rl-on-policy-target` (seen in /server_info) and `SGLANG_RETURN_ORIGINAL_LOGPROB=1` change that. The
  server's environment is not visible over HTTP; the trainer's own is checked (srun hands one environment
  to the trainer and the servers), and `launch.py` checks the servers' own before starting them;
- seeds: `sampling_seed` is honoured only by servers launched with `--enable-deterministic-inference`;
- TP / DP: the NCCL weight group gives server k the ranks `rank_offset + tp_rank`, so its size must be
  the server's TP; DP or PP replicas inside one server would claim the same ranks and are refused;
- weight version: servers should start at the trainer's version (`--weight-version 0`); a server at
  `"default"` (launched without it) or at another version is reported.

`resolve_master_address` picks the address the servers use to reach the trainer's rank 0 for the NCCL
weight group: an explicit setting, else the IPv4 address of `socket_ifname` (COPSD_SOCKET_IFNAME), else
the host name's address -- refused when that is loopback (127.x, e.g. Debian's 127.0.1.1) while a server
runs on another host.
"""
from __future__ import annotations

import ipaddress
import socket
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence
from urllib.parse import urlsplit

LOGPROB_ENV = "SGLANG_RETURN_ORIGINAL_LOGPROB"


@dataclass
class ServerFacts:
    """What one server says about itself (None: not reported)."""

    url: str
    weight_version: str
    tp_size: int | None = None
    dp_size: int | None = None
    pp_size: int | None = None
    deterministic: bool | None = None
    rl_on_policy_target: str | None = None
    sglang_version: str | None = None


def _get_json(engine, url: str, path: str):
    import requests

    from megatron_copsd.rollout.sglang_client import SGLangError

    try:
        r = engine.request("GET", url, path, timeout_s=30.0)
    except requests.RequestException as e:
        raise SGLangError(f"{url}{path}: {type(e).__name__}: {e}") from e
    if r.status_code == 404:
        return None
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code != 200 or not isinstance(body, dict):
        raise SGLangError(f"{url}{path}: HTTP {r.status_code}: {r.text[:300]}")
    return body


def read_weight_version(engine, url: str) -> str:
    """`weight_version` from GET /model_info (SGLang 0.5.23); SGLangError if the server does not say."""
    from megatron_copsd.rollout.sglang_client import SGLangError

    info = _get_json(engine, url, "/model_info")
    if info is None or "weight_version" not in info:
        raise SGLangError(
            f"{url}/model_info: not served (or without weight_version). Is {url} an sglang_router rather than "
            "a server (list routers in rollout.sglang_router_url, servers in rollout.sglang_urls), or an "
            "SGLang older than 0.5.23?")
    return str(info["weight_version"])


def read_server_facts(engine, url: str) -> ServerFacts:
    """GET /model_info (must exist) and /server_info (its missing fields stay None) of one server."""
    version = read_weight_version(engine, url)
    server = _get_json(engine, url, "/server_info") or {}

    def opt_int(key):
        return int(server[key]) if server.get(key) is not None else None

    det = server.get("enable_deterministic_inference")
    return ServerFacts(
        url=url, weight_version=version, tp_size=opt_int("tp_size"),
        dp_size=opt_int("dp_size"), pp_size=opt_int("pp_size"), deterministic=None if det is None else bool(det),
        rl_on_policy_target=server.get("rl_on_policy_target") or None, sglang_version=server.get("version"))


def env_flag(environ: Mapping[str, str], name: str) -> bool:
    """SGLang's reading of a boolean environment variable: "1" or "true" (any case)."""
    return str(environ.get(name, "")).strip().lower() in ("1", "true")


def check_servers(facts: Sequence[ServerFacts], *, environ: Mapping[str, str], send_seed: bool,
                  server_tp: int | None, weight_sync: str | None, expected_version: str) -> None:
    """Raises SGLangError (or ValueError for the trainer's own environment) for what would make rollouts
    silently wrong; warns for what only mislabels them. See the module docstring."""
    from megatron_copsd.rollout.sglang_client import SGLangError

    if env_flag(environ, LOGPROB_ENV):
        raise ValueError(
            f"{LOGPROB_ENV}={environ[LOGPROB_ENV]} is set in this environment (and so, under srun, in the SGLang "
            "servers'): it makes SGLang return unscaled log-probs, while the trainer uses log_softmax(logits / T) "
            f"(rollout/types.py). Unset {LOGPROB_ENV}.")
    for f in facts:
        if f.rl_on_policy_target:
            raise SGLangError(
                f"{f.url} runs with --rl-on-policy-target={f.rl_on_policy_target}, which changes the returned "
                "log-probs away from log_softmax(logits / T) that the trainer uses; relaunch without it")
        if send_seed and f.deterministic is not True:
            how = "without" if f.deterministic is False else "perhaps without (not reported in /server_info)"
            raise SGLangError(
                f"{f.url} runs {how} --enable-deterministic-inference, so it would ignore sampling_seed; "
                "launch the servers with it (rollout.sglang_deterministic=true does that in slurm/train.sbatch) "
                "or do not ask for seeds")
        if server_tp is not None and f.tp_size is not None and f.tp_size != server_tp:
            raise SGLangError(f"{f.url} runs with tp_size={f.tp_size}, but rollout.sglang_tp={server_tp}")
        if weight_sync == "nccl":
            for key in ("dp_size", "pp_size"):
                if (getattr(f, key) or 1) > 1:
                    raise SGLangError(
                        f"{f.url} runs with {key}={getattr(f, key)}: NCCL weight sync gives each server's GPUs the "
                        "group ranks rank_offset + tp_rank, which its replicas would share. Launch one server "
                        "per replica (dp_size=pp_size=1) or use rollout.weight_sync=disk")
    versions = sorted({f.weight_version for f in facts})
    if versions and versions != [expected_version]:
        warnings.warn(
            f"SGLang servers report weight version(s) {versions}, the trainer starts at {expected_version!r}"
            + (" ('default': launched without --weight-version)" if "default" in versions else "")
            + "; rollouts before the first weight sync carry the servers' version", stacklevel=3)


def url_host(url: str) -> str:
    return urlsplit(url if "://" in url else f"http://{url}").hostname or ""


def is_loopback_host(host: str) -> bool:
    """True for localhost / 127.x / ::1, also through name resolution (a host name that maps to 127.0.1.1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except OSError:
        return False  # unresolvable here: treat as remote


def interface_ipv4(name: str) -> str:
    """IPv4 address of network interface `name` (Linux SIOCGIFADDR); ValueError naming it if it has none."""
    import fcntl
    import struct

    names = [n for _, n in socket.if_nameindex()]
    if name not in names:
        raise ValueError(f"network interface {name!r} (COPSD_SOCKET_IFNAME) does not exist here; have {names}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
        except OSError as e:
            raise ValueError(f"network interface {name!r} (COPSD_SOCKET_IFNAME) has no IPv4 address: {e}") from None
    return socket.inet_ntoa(packed[20:24])


def resolve_master_address(explicit: str | None, socket_ifname: str | None, server_urls: Sequence[str]) -> str:
    """Address of the trainer's rank 0 for the weight group, as the servers must dial it (module docstring)."""
    if explicit:
        address, source = explicit, "rollout.weight_sync_master_address"
    elif socket_ifname:
        address, source = interface_ipv4(socket_ifname), f"interface {socket_ifname}"
    else:
        address, source = socket.gethostbyname(socket.gethostname()), f"host name {socket.gethostname()}"
    remote = [u for u in server_urls if not is_loopback_host(url_host(u))]
    if is_loopback_host(address) and remote:
        raise ValueError(
            f"weight-sync master address {address} (from {source}) is a loopback address, unreachable from "
            f"servers on other hosts ({remote[:3]}); set COPSD_SOCKET_IFNAME to the interface the servers reach "
            "this node on (e.g. ib0) or rollout.weight_sync_master_address")
    return address
