#!/bin/bash
# The SGLang servers of one node (and, on the step's first node, the router), as one task of an srun step.
# Started by slurm/train.sbatch (one task per server node), never by hand:
#
#   srun --nodes=K --ntasks-per-node=1 --nodelist=... bash slurm/sglang_servers.sh ROUTER_URL [copsd train args...]
#
# ROUTER_URL is http://<first server node>:<port>. The `copsd train` arguments (--config X.yaml key=value ...)
# go to `python -m megatron_copsd.rollout.launch`, which derives every SGLang flag (model path, TP size,
# memory fraction) from the run config -- no SGLang option is spelled here. Each node runs
# COPSD_GPUS_PER_NODE / COPSD_SGLANG_TP servers on consecutive GPU slices and ports
# COPSD_SGLANG_PORT (default 31000), +1, ...; the trainer waits for /health_generate before the first rollout.
# SIGTERM (sent by train.sbatch through srun when training ends) stops the servers this script started.
set -euo pipefail

router_url=${1:?usage: sglang_servers.sh ROUTER_URL [copsd train args...]}
shift
# shellcheck source=slurm/common.sh
source "${COPSD_ROOT:?set by train.sbatch}/slurm/common.sh"

gpus_per_node=${COPSD_GPUS_PER_NODE:-8}
server_tp=${COPSD_SGLANG_TP:-1}
base_port=${COPSD_SGLANG_PORT:-31000}
router_port=${router_url##*:}
if (( server_tp < 1 || gpus_per_node % server_tp != 0 )); then
    echo "sglang_servers.sh: COPSD_SGLANG_TP=$server_tp must divide COPSD_GPUS_PER_NODE=$gpus_per_node" >&2
    exit 2
fi
num_servers=$(( gpus_per_node / server_tp ))
host=$(hostname)

pids=()
# shellcheck disable=SC2317  # reached through the trap below
stop_servers() {
    copsd_log "stopping ${#pids[@]} SGLang processes on $host"
    if (( ${#pids[@]} )); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
    fi
}
trap stop_servers TERM INT

for (( i = 0; i < num_servers; i++ )); do
    first_gpu=$(( i * server_tp ))
    devices=$(seq -s, "$first_gpu" $(( first_gpu + server_tp - 1 )))
    CUDA_VISIBLE_DEVICES=$devices "$COPSD_PYTHON" -m megatron_copsd.rollout.launch server \
        --host 0.0.0.0 --port $(( base_port + i )) "$@" > "$LOG_DIR/sglang-$host-$i.log" 2>&1 &
    pids+=("$!")
done
copsd_log "$num_servers SGLang servers on $host (GPUs per server: $server_tp, ports from $base_port)"

# The first task of the step also runs the router in front of every server of every server node.
if [ "${SLURM_PROCID:-0}" = 0 ]; then
    workers=()
    while IFS= read -r node; do
        for (( i = 0; i < num_servers; i++ )); do
            workers+=("http://$node:$(( base_port + i ))")
        done
    done < <(scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}")
    "$COPSD_PYTHON" -m megatron_copsd.rollout.launch router --host 0.0.0.0 --port "$router_port" \
        --worker-urls "${workers[@]}" > "$LOG_DIR/sglang-router.log" 2>&1 &
    pids+=("$!")
    copsd_log "router $router_url over ${#workers[@]} servers"
fi

# Exit as soon as one server dies (the trainer then fails its health check loudly) or on SIGTERM.
rc=0
wait -n "${pids[@]}" || rc=$?
stop_servers
wait || true
exit "$rc"
