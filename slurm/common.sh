# shellcheck shell=bash
# Shared environment for the sbatch scripts in slurm/. Sourced, never executed:
#
#   source "${COPSD_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
#
# Knobs (environment variables, all optional):
#   COPSD_ROOT              repo checkout (default: the directory sbatch was run from)
#   COPSD_PYTHON            python to run (default: $COPSD_VENV/bin/python, else python3 on PATH)
#   COPSD_VENV              virtualenv whose python to use when COPSD_PYTHON is unset
#   COPSD_LOG_ROOT          parent of the per-job log dirs (default: $COPSD_ROOT/logs)
#   COPSD_SOCKET_IFNAME     network interface for gloo and NCCL (sets both variables below)
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME   per-library override (win over COPSD_SOCKET_IFNAME)
#   MASTER_PORT             rendezvous port (default: 15000 + job id % 20000, like megatron_copsd.megatron.dist)
#
# Sets: COPSD_ROOT, COPSD_PYTHON, LOG_DIR (created), PYTHONUNBUFFERED, OMP_NUM_THREADS, and the helpers
# copsd_hostnames, copsd_set_master, copsd_log.

COPSD_ROOT=${COPSD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$COPSD_ROOT/slurm/common.sh" ]; then
    echo "common.sh: COPSD_ROOT=$COPSD_ROOT is not a megatron-copsd checkout (submit from the repo root or set COPSD_ROOT)" >&2
    exit 2
fi
export COPSD_ROOT

if [ -z "${COPSD_PYTHON:-}" ]; then
    if [ -n "${COPSD_VENV:-}" ]; then
        COPSD_PYTHON=$COPSD_VENV/bin/python
    else
        COPSD_PYTHON=$(command -v python3)
    fi
fi
if [ ! -x "$COPSD_PYTHON" ]; then
    echo "common.sh: COPSD_PYTHON=$COPSD_PYTHON is not an executable python" >&2
    exit 2
fi
export COPSD_PYTHON

# Logs of every rank/server appear as they happen, not when a buffer fills.
export PYTHONUNBUFFERED=1
# One thread pool per rank sized to the rank's CPUs; the default (all cores) oversubscribes a node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

if [ -n "${COPSD_SOCKET_IFNAME:-}" ]; then
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$COPSD_SOCKET_IFNAME}
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$COPSD_SOCKET_IFNAME}
fi

# One log directory per job (a resubmitted job gets its own), next to the sbatch output file.
LOG_DIR=${COPSD_LOG_ROOT:-$COPSD_ROOT/logs}/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:-$$}
mkdir -p "$LOG_DIR"
export LOG_DIR

copsd_log() {
    echo "[$(date '+%F %T')] ${SLURM_JOB_NAME:-job} ${SLURM_JOB_ID:-}: $*"
}

# Node names of the allocation, one per line, in Slurm's order.
copsd_hostnames() {
    scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm allocation}"
}

# MASTER_ADDR = first node that runs Megatron ranks (argument 1, default: first node of the job).
copsd_set_master() {
    local first=${1:-}
    if [ -z "$first" ]; then
        first=$(copsd_hostnames | head -n 1)
    fi
    export MASTER_ADDR=${MASTER_ADDR:-$first}
    export MASTER_PORT=${MASTER_PORT:-$((15000 + ${SLURM_JOB_ID:-0} % 20000))}
}

copsd_log "root=$COPSD_ROOT python=$COPSD_PYTHON logs=$LOG_DIR nodes=${SLURM_JOB_NODELIST:-?}" \
    "gloo_if=${GLOO_SOCKET_IFNAME:-auto} nccl_if=${NCCL_SOCKET_IFNAME:-auto}"

# Prints "<model.hf_path> <rollout.sglang_tp> <rollout.sglang_mem_fraction> <rollout.weight_sync>
# <rollout.sglang_deterministic as 0/1>" of the run config given as `copsd train` arguments (--config X.yaml
# key=value ...), so the SGLang servers serve the same model with the config's own settings and nothing about
# the model is spelled in bash.
copsd_rollout_settings() {
    "$COPSD_PYTHON" - "$@" <<'PY'
import argparse, sys
from megatron_copsd.config import load_config
parser = argparse.ArgumentParser()
parser.add_argument("--config")
args, overrides = parser.parse_known_args(sys.argv[1:])
# A placeholder server URL only to pass the "sglang needs URLs" check: the URLs are what we are about to make.
cfg = load_config(args.config, [o for o in overrides if "=" in o]
                  + ["rollout.engine=sglang", "rollout.sglang_urls=[http://127.0.0.1:1]"])
r = cfg.rollout
print(cfg.model.hf_path, r.sglang_tp, r.sglang_mem_fraction, r.weight_sync, int(r.sglang_deterministic))
PY
}
