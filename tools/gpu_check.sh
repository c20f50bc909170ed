#!/usr/bin/env bash
# One prepared check of the GPU path on a single-GPU machine: <= 8 minutes, downloads nothing.
#
#   COPSD_WHEELS=/path/to/wheels tools/gpu_check.sh [--out DIR] [--python PY]
#   tools/gpu_check.sh --dry            # print the plan and exit
#
# torch (CUDA build), triton and transformers may come preinstalled with the chosen Python; the project
# and its other pure-Python dependencies (megatron-core, ...) are installed offline from the wheel folder
# COPSD_WHEELS (pip --no-index --find-links) into a venv that also sees the system site-packages. When the
# project already imports, nothing is installed. Steps (each under its own time limit):
#   1. kernel parity on CUDA: the Triton kernels (compiled, not interpreted) against the float64 reference,
#      fp32 and bf16 (tests/kernels/test_cuda_parity.py), and store / recompute modes with the vocab-split
#      recompute kernels, the per-entry clip and the small-divergence accuracy (tests/kernels/test_store_cuda.py);
#   2. the kernel benchmark at Qwen3 shapes: fused vs naive (and Liger when it imports);
#   3. a 20-step tiny COPSD run in bf16 on the GPU and the same run in fp32 on the CPU, compared per step.
# Everything goes to one report file, $OUT/gpu_check_report.md (default OUT=gpu_check_out).
set -u -o pipefail

DRY=0
OUT="gpu_check_out"
PY="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        --python) PY="$2"; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPORT="$OUT/gpu_check_report.md"
VENV="$OUT/venv"
STEPS=(
    "install  | 60 s  | venv (system site-packages) + pip install --no-index --find-links \$COPSD_WHEELS -e REPO (skipped when megatron_copsd imports)"
    "parity   | 170 s | pytest tests/kernels/test_cuda_parity.py tests/kernels/test_store_cuda.py: Triton on CUDA vs float64 reference, fp32 + bf16, store + recompute"
    "bench    | 90 s  | copsd bench-kernels --mode gpu at the Qwen3-8B head shape (T 4096, H 4096, V 151936, bf16): fused vs naive (+ liger if importable)"
    "tiny-gpu | 75 s  | copsd train examples/tiny_cpu_copsd.yaml, 20 steps, bf16 on cuda:0"
    "tiny-cpu | 75 s  | the same run, fp32 on CPU (CUDA_VISIBLE_DEVICES empty)"
    "compare  | 10 s  | per-step loss / divergence of both runs side by side -> report"
)

if [ "$DRY" = 1 ]; then
    echo "gpu_check.sh plan (report: $REPORT; total limit 480 s)"
    for s in "${STEPS[@]}"; do echo "  $s"; done
    echo "wheels: COPSD_WHEELS=${COPSD_WHEELS:-<unset>}; python: $PY; repo: $REPO"
    exit 0
fi

mkdir -p "$OUT"
START=$(date +%s)
FAILED=0
{
    echo "# copsd GPU check"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); host: $(hostname); repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown))"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/- gpu: /'
} > "$REPORT"

section() {  # section NAME LIMIT_S COMMAND...: runs under a time limit, appends output + status to the report
    local name="$1" limit="$2"
    shift 2
    local t0 rc
    t0=$(date +%s)
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    {
        echo
        echo "## $name: $([ "$rc" = 0 ] && echo PASS || echo "FAIL (exit $rc$([ "$rc" = 124 ] && echo ', time limit'))") in $(( $(date +%s) - t0 )) s"
        echo
        echo '```'
        tail -n 40 "$OUT/$name.log"
        echo '```'
    } >> "$REPORT"
    [ "$rc" = 0 ] || FAILED=1
    return "$rc"
}

install() {
    if "$PY" -c "import megatron_copsd, megatron.core" 2>/dev/null; then
        echo "megatron_copsd already importable with $PY; nothing installed"
        return 0
    fi
    if [ -z "${COPSD_WHEELS:-}" ] || [ ! -d "${COPSD_WHEELS:-}" ]; then
        echo "COPSD_WHEELS must name a folder of wheels (megatron-core and the other pure-Python deps)" >&2
        return 2
    fi
    "$PY" -m venv --system-site-packages "$VENV" || return 1
    timeout 55 "$VENV/bin/python" -m pip install --no-index --find-links "$COPSD_WHEELS" --no-build-isolation -e "$REPO" || return 1
    PY="$VENV/bin/python"
}

cd "$REPO" || exit 1
if install > "$OUT/install.log" 2>&1; then
    echo -e "\n## install: PASS\n\n\`\`\`\n$(tail -n 5 "$OUT/install.log")\n\`\`\`" >> "$REPORT"
else
    echo -e "\n## install: FAIL\n\n\`\`\`\n$(tail -n 20 "$OUT/install.log")\n\`\`\`" >> "$REPORT"
    echo "install failed; see $REPORT"
    exit 1
fi
[ -x "$VENV/bin/python" ] && PY="$VENV/bin/python"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo -e "\n## cuda: FAIL (torch.cuda.is_available() is False for $PY)" >> "$REPORT"
    echo "no usable GPU for $PY; see $REPORT"
    exit 1
}

section parity 170 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_cuda_parity.py tests/kernels/test_store_cuda.py
section bench 90 "$PY" -m copsd_kernels.bench --mode gpu --impls fused,naive,liger --T 4096 --H 4096 --V 151936 \
    --dtype bf16 --repeat 5 --out-dir "$OUT/bench"
export COPSD_TINY_OVERRIDES="train.steps=20 eval.every=0 checkpoint.save_every=0 logging.progress_bar=false"
# shellcheck disable=SC2086  # the overrides are meant to split into words
section tiny-gpu 75 "$PY" -m megatron_copsd.train --config examples/tiny_cpu_copsd.yaml $COPSD_TINY_OVERRIDES \
    model.dtype=bf16 train.output_dir="$OUT/tiny_gpu"
# shellcheck disable=SC2086
section tiny-cpu 75 env CUDA_VISIBLE_DEVICES= "$PY" -m megatron_copsd.train --config examples/tiny_cpu_copsd.yaml \
    $COPSD_TINY_OVERRIDES model.dtype=fp32 train.output_dir="$OUT/tiny_cpu"
section compare 10 "$PY" - "$OUT/tiny_gpu/metrics.jsonl" "$OUT/tiny_cpu/metrics.jsonl" <<'EOF'
import json, math, sys

def load(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r and not r.get("eval")}

gpu, cpu = load(sys.argv[1]), load(sys.argv[2])
print("| step | loss bf16 GPU | loss fp32 CPU | divergence GPU | divergence CPU |")
print("|---|---|---|---|---|")
for step in sorted(set(gpu) | set(cpu)):
    g, c = gpu.get(step, {}), cpu.get(step, {})
    print(f"| {step} | {g.get('loss', float('nan')):.4g} | {c.get('loss', float('nan')):.4g} | "
          f"{g.get('divergence', float('nan')):.4g} | {c.get('divergence', float('nan')):.4g} |")
bad = [s for s, r in gpu.items() if not math.isfinite(r["loss"])]
print(f"steps: GPU {len(gpu)}, CPU {len(cpu)}; non-finite GPU losses at {bad or 'none'}")
print("(the rollouts are sampled on each device, so the runs see different tokens: compare trends, not values)")
sys.exit(0 if len(gpu) == 20 and len(cpu) == 20 and not bad else 1)
EOF

echo -e "\n**total: $(( $(date +%s) - START )) s, $([ "$FAILED" = 0 ] && echo 'all steps passed' || echo 'some steps FAILED')**" >> "$REPORT"
echo "report: $REPORT"
exit "$FAILED"
