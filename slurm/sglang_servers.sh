#!/bin/bash
# The SGLang servers of one node (and optionally the router), as one task of an srun step. Started by
# slurm/train.sbatch with one task per server node, which reads the arguments from the run config:
#
#   srun --nodes=K --ntasks-per-node=1 ... bash slurm/sglang_servers.sh MODEL_PATH TP MEM_FRACTION NUM_SERVERS \
#       WEIGHT_SYNC DETERMINISTIC
#
# Server i of the node gets GPUs [i*TP, (i+1)*TP) and port COPSD_SGLANG_PORT + i (default 30000 + i). The
# command lines come from `python -m megatron_copsd.rollout.launch` (no SGLang flag is spelled here): every
# server starts at --weight-version 0, with --enable-deterministic-inference when DETERMINISTIC is 1
# (rollout.sglang_deterministic: the trainer then sends seeds), and launch.py refuses an environment that
# changes SGLang's log-prob semantics (SGLANG_RETURN_ORIGINAL_LOGPROB=1). WEIGHT_SYNC is rollout.weight_sync
# (disk or nccl).
# With COPSD_SGLANG_ROUTER=1 the step's first task also starts `sglang_router` on COPSD_ROUTER_PORT
# (default 30100) with every server of the step as a worker. COPSD_SGLANG_PYTHON picks the python that has
# sglang installed (default: COPSD_PYTHON). Logs: $LOG_DIR/sglang-<host>-<i>.log, sglang-router.log.
# Exits when one server dies, or on SIGTERM (sent through srun when training ends), stopping exactly the
# processes it started.
set -euo pipefail

if [ $# -ne 6 ]; then
    echo "usage: sglang_servers.sh MODEL_PATH TP MEM_FRACTION NUM_SERVERS WEIGHT_SYNC DETERMINISTIC" >&2
    exit 2
fi
model_path=$1 server_tp=$2 mem_fraction=$3 num_servers=$4 weight_sync=$5 deterministic=$6
# shellcheck source=slurm/common.sh
source "${COPSD_ROOT:?set by train.sbatch}/slurm/common.sh"
sglang_python=${COPSD_SGLANG_PYTHON:-$COPSD_PYTHON}
base_port=${COPSD_SGLANG_PORT:-30000}
host=$(hostname)

pids=()
# shellcheck disable=SC2317  # reached through the trap below
stop_all() {
    if (( ${#pids[@]} )); then
        copsd_log "stopping ${#pids[@]} SGLang processes on $host"
        kill -TERM "${pids[@]}" 2>/dev/null || true
    fi
}
trap stop_all TERM INT

# launch.py prints the argv one argument per line.
launch() {
    local out
    out=$("$COPSD_PYTHON" -m megatron_copsd.rollout.launch "$@" --python "$sglang_python") || {
        copsd_log "rollout.launch refused to start SGLang on $host (reason above)"
        exit 2
    }
    mapfile -t cmd <<<"$out"
}

server_flags=(--weight-sync "$weight_sync" --weight-version 0)
if [ "$deterministic" = 1 ]; then
    server_flags+=(--deterministic)
fi

for (( i = 0; i < num_servers; i++ )); do
    first_gpu=$(( i * server_tp ))
    launch server --model-path "$model_path" --tp "$server_tp" --mem-fraction "$mem_fraction" \
        --host 0.0.0.0 --port $(( base_port + i )) "${server_flags[@]}"
    CUDA_VISIBLE_DEVICES=$(seq -s, "$first_gpu" $(( first_gpu + server_tp - 1 ))) \
        "${cmd[@]}" > "$LOG_DIR/sglang-$host-$i.log" 2>&1 &
    pids+=("$!")
done
copsd_log "$num_servers SGLang servers on $host (TP=$server_tp, ports $base_port..$(( base_port + num_servers - 1 )))"

if [ "${COPSD_SGLANG_ROUTER:-0}" = 1 ] && [ "${SLURM_PROCID:-0}" = 0 ]; then
    workers=()
    while IFS= read -r node; do
        for (( i = 0; i < num_servers; i++ )); do
            workers+=(--worker "http://$node:$(( base_port + i ))")
        done
    done < <(scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}")
    launch router --host 0.0.0.0 --port "${COPSD_ROUTER_PORT:-30100}" "${workers[@]}"
    "${cmd[@]}" > "$LOG_DIR/sglang-router.log" 2>&1 &
    pids+=("$!")
    copsd_log "router http://$host:${COPSD_ROUTER_PORT:-30100} over $(( ${#workers[@]} / 2 )) servers"
fi

rc=0
wait -n "${pids[@]}" || rc=$?
stop_all
wait || true
exit "$rc"
