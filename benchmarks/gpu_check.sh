#!/usr/bin/env bash
# The first-GPU check (issue 16, section 4): one script, at most 8 minutes on one H100/H200.
#
#   1. the `gpu`-marked tests;
#   2. CERTIFY of ResNet-110 at N = 100,000 (n0 = 100) on 20 CIFAR-10 test images against a faithful copy of
#      Cohen et al.'s code on the same GPU in the same run (benchmarks/certify_throughput.py), s/image and the
#      ratio: first eager bf16 (the CLI's path with --amp bf16, and the Python API with its defaults), then
#      bf16 + torch.compile (the CLI's --amp bf16 --compile; a step of its own, since compiling is the risk);
#   3. 200 training steps of ResNet-110 with bf16 autocast (pretrain, Gaussian noise, batch 64);
#   4. the quick demo (`smoothtransfer demo --preset quick`) on the GPU;
# then one summary table. Each step has its own time limit (and the whole a budget, GPU_CHECK_BUDGET seconds,
# default 450); a failed or timed-out step is marked in the table and the next one runs.
#
# Needs: an NVIDIA GPU; a Python with torch (CUDA), torchvision, timm, numpy, scipy, tqdm, pyyaml,
# matplotlib, pillow and pytest (the device image has them all; nothing is downloaded: the package runs from
# src/ via PYTHONPATH, and wheels carried in .whl/ are installed if something is missing); the data:
# $SMOOTHTRANSFER_DATA, else ../shared/datasets, else shared/datasets, else .gpu_data (the 49 MiB subset
# `python benchmarks/gpu_data_subset.py` writes; carry it). With the device tool, from this repository:
#
#   python benchmarks/gpu_data_subset.py                  # here, once: writes .gpu_data/ (git-ignored)
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_data"], timeout_s=560)
#
# Results go to $OUT when set (the device tool's folder that comes back; 6 files), else runs/gpu_check/:
# summary.md, gpu_check.log, certify.json, certify_compile.json, train_summary.json, demo_report.md.
# GPU_CHECK_DRY=1 runs the same plumbing on the CPU with tiny sizes (no figures; for checking the script).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUDGET=${GPU_CHECK_BUDGET:-450}
DRY=${GPU_CHECK_DRY:-0}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/smoothtransfer-gpu-check}
RESULTS=${OUT:-$ROOT/runs/gpu_check}
START=$(date +%s)
mkdir -p "$WORK/steps" "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PIP_DISABLE_PIP_VERSION_CHECK=1 TQDM_DISABLE=1
export SMOOTHTRANSFER_CACHE="$WORK/cache"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"  # this work tree's package, installed or not

NAMES=()
STATES=()
SECONDS_USED=()

log() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(($(date +%s) - START)); }

record() { # record NAME STATE SECONDS
  NAMES+=("$1")
  STATES+=("$2")
  SECONDS_USED+=("$3")
}

# run_step KEY CAP COMMAND...: at most CAP seconds (less if the budget is nearly spent), output to the log.
run_step() {
  local key=$1 cap=$2
  shift 2
  local left=$((BUDGET - $(elapsed)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    log "=== $key: skipped, the ${BUDGET}s budget is spent"
    record "$key" "SKIPPED (budget)" 0
    return 0
  fi
  log "=== $key (limit ${limit}s, at +$(elapsed)s): $*"
  local t0 rc
  t0=$(date +%s)
  set +e
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$WORK/steps/$key.log" >>"$LOG"
  rc=${PIPESTATUS[0]}
  set -e
  local dt=$(($(date +%s) - t0))
  if ((rc == 0)); then
    record "$key" ok "$dt"
  elif ((rc == 124 || rc == 137)); then
    record "$key" "TIMEOUT (${limit}s)" "$dt"
  else
    record "$key" "FAILED (exit $rc)" "$dt"
  fi
  log "=== $key: ${STATES[-1]} after ${dt}s"
}

# ------------------------------------------------------------------------------------------ environment
PY=""
for cand in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3 python; do
  if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
    PY=$(command -v "$cand")
    break
  fi
done
MODULES="torch torchvision timm numpy scipy tqdm yaml matplotlib PIL pytest"
missing() { "$PY" -c "
import importlib.util, sys
print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))" $MODULES; }
ENV_OK=1
if [ -z "$PY" ]; then
  log "no Python with torch found (set PYTHON=...)"
  ENV_OK=0
else
  if [ -n "$(missing)" ] && compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    log "installing carried wheels for: $(missing)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$ROOT"/.whl/*.whl >>"$LOG" 2>&1 || true
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
  fi
  if [ -n "$(missing)" ]; then
    log "missing Python modules: $(missing)"
    ENV_OK=0
  fi
fi
if ((ENV_OK)); then
  "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"python {platform.python_version()} torch {torch.__version__} cuda {torch.version.cuda} | {gpu}")
EOF
  if [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device: this check needs a GPU (GPU_CHECK_DRY=1 checks the script on the CPU)"
    ENV_OK=0
  fi
fi
DATA=""
for d in "${SMOOTHTRANSFER_DATA:-}" "$ROOT/../shared/datasets" "$ROOT/shared/datasets" "$ROOT/.gpu_data"; do
  if [ -n "$d" ] && [ -f "$d/cifar10/train.zip" ] && [ -f "$d/cifar10/test.zip" ] &&
    [ -f "$d/tiny-imagenet-32/train.zip" ]; then
    DATA=$(cd "$d" && pwd)
    break
  fi
done
if [ -z "$DATA" ]; then
  log "no datasets: set SMOOTHTRANSFER_DATA, or run 'python benchmarks/gpu_data_subset.py' and carry .gpu_data"
  ENV_OK=0
else
  log "data: $DATA"
fi
record environment "$( ((ENV_OK)) && echo ok || echo FAILED)" "$(elapsed)"

# ------------------------------------------------------------------------------------------------ steps
if ((ENV_OK)); then
  if [ "$DRY" = 1 ]; then
    DEV=cpu
    CERT=(--device cpu --models resnet20 --n 200 --n0 20 --images 2 --ref-images 1 --batch-size 128
      --variants cli,py)
    CERT_COMPILE=(--device cpu --models resnet20 --n 100 --n0 10 --images 1 --ref-images 1 --batch-size 64
      --compile --variants cli+compile)
    TRAIN=(--device cpu --model resnet20 --max-train 320 --amp none)
    DEMO=(--device cpu --set epochs=1 --set data.max_train=256 --set certify.max=4 --set certify.n=64
      --set certify.n0=16 --set compile=false --set certify.compile=false)
  else
    DEV=cuda
    # The reference (fp32, batch 400, as released) certifies the first 5 images: its rate is per sample.
    # cli: the CLI's path (certify --amp bf16), batch 1000; py: Smooth(model, 10, 0.25).certify(x, 100, 100000,
    # 0.001) with every default (bf16 where supported, batch from free memory).
    CERT=(--device cuda --models resnet110 --n 100000 --n0 100 --images 20 --ref-images 5 --amp bf16
      --batch-size 1000 --variants cli,py --py-batch-size auto)
    # cli+compile: certify --amp bf16 --compile, batch 1000 (two compiled shapes: 100 and 1000 samples).
    CERT_COMPILE=(--device cuda --models resnet110 --n 100000 --n0 100 --images 20 --ref-images 3 --amp bf16
      --compile --batch-size 1000 --variants cli+compile)
    TRAIN=(--device cuda --model resnet110 --max-train 12800 --amp bf16)
    # the quick preset compiles for the CPU; its first compile on a GPU would eat this step's 180 s
    DEMO=(--device cuda --set compile=false --set certify.compile=false)
  fi
  mapfile -t GPU_TEST_FILES < <(grep -rl --include="test_*.py" "mark.gpu" tests)
  run_step gpu-tests 60 "$PY" -m pytest -m gpu -q -p no:cacheprovider "${GPU_TEST_FILES[@]}"
  run_step certify 120 "$PY" benchmarks/certify_throughput.py "${CERT[@]}" --dataset cifar10 \
    --data-root "$DATA" --json "$RESULTS/certify.json"
  run_step certify-compile 180 "$PY" benchmarks/certify_throughput.py "${CERT_COMPILE[@]}" --dataset cifar10 \
    --data-root "$DATA" --json "$RESULTS/certify_compile.json"
  rm -rf "$WORK/train200"
  # 12800 images / batch 64 = 200 optimizer steps in one epoch
  run_step train-200-steps 90 "$PY" -m smoothtransfer.cli pretrain --dataset cifar10 --data-root "$DATA" \
    --norm batch --objective gaussian --sigma 0.25 --epochs 1 --batch-size 64 --eval-sigmas 0.25 \
    --out "$WORK/train200" --no-progress --set tensorboard=false "${TRAIN[@]}"
  cp "$WORK/train200/train_summary.json" "$RESULTS/train_summary.json" 2>/dev/null || true
  rm -rf "$WORK/demo"
  run_step demo-quick 180 "$PY" -m smoothtransfer.cli demo --preset quick --data-root "$DATA" --out "$WORK/demo" \
    --no-progress "${DEMO[@]}"
  cp "$WORK/demo/report.md" "$RESULTS/demo_report.md" 2>/dev/null || true
fi

# ---------------------------------------------------------------------------------------------- summary
STEPS_TSV="$WORK/steps.tsv"
: >"$STEPS_TSV"
for i in "${!NAMES[@]}"; do
  printf '%s\t%s\t%s\n' "${NAMES[$i]}" "${STATES[$i]}" "${SECONDS_USED[$i]}" >>"$STEPS_TSV"
done
SUMMARY_PY=${PY:-python3}
"$SUMMARY_PY" - "$STEPS_TSV" "$RESULTS" "$WORK" "$DRY" <<'EOF' | tee "$RESULTS/summary.md"
import json, re, sys
from pathlib import Path

steps_tsv, results, work, dry = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"


def step_log(key):
    p = work / "steps" / f"{key}.log"
    return p.read_text(errors="replace") if p.exists() else ""


def gpu_tests():
    lines = [l for l in step_log("gpu-tests").splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", l)]
    return lines[-1].strip("= ") if lines else "-"


def certify(name="certify.json"):
    p = results / name
    if not p.exists():
        return "-"
    d = json.loads(p.read_text())
    r = d["results"][0]
    parts, ref = [], None
    for name, v in r["variants"].items():
        if v["key"] == "cohen":
            ref = v
            parts.append(f"Cohen et al.'s code {v['s_per_image']:.2f} s/image ({v['images']} images)")
        else:
            parts.append(f"{name} {v['s_per_image']:.2f} s/image = {v['ratio']:.2f}x")
    return f"{r['model']}, N={r['n']}, n0={r['n0']}, {d['processor']}: " + "; ".join(parts)


def train():
    p = results / "train_summary.json"
    if not p.exists():
        return "-"
    h = json.loads(p.read_text())["history"][0]
    steps = int(round(h["images_per_s"] * h["seconds"] / 64))
    return (f"{steps} steps in {h['seconds']:.1f} s ({steps / h['seconds']:.1f} steps/s, "
            f"{h['images_per_s']:.0f} images/s); val acc {100 * h.get('val_acc', float('nan')):.1f}%")


def demo():
    text = step_log("demo-quick")
    done = re.findall(r"finished in ([\d.]+) min", text)
    out = f"finished in {done[-1]} min" if done else "-"
    lines = text.splitlines()
    for i, line in enumerate(lines):  # the demo's table: | model | σ | smoothed clean | ε=0.25 | ...
        head = [c.strip() for c in line.strip().strip("|").split("|")]
        if "σ" not in head or "ε=0.5" not in head:
            continue
        for row in lines[i + 2:]:
            if not row.startswith("|"):
                break
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            cell = dict(zip(head, cells))
            if cell.get("σ") == "0.25":
                clean = next((v for k, v in cell.items() if "clean" in k), "?")
                out += f"; σ=0.25: clean {clean}, certified at ε=0.5 {cell['ε=0.5']}"
                return out
    return out


results_of = {"gpu-tests": gpu_tests, "certify": certify, "certify-compile": lambda: certify("certify_compile.json"),
              "train-200-steps": train, "demo-quick": demo}
print(f"## GPU check{' (DRY RUN on the CPU: plumbing only, no GPU figures)' if dry else ''}\n")
print("| step | status | seconds | result |")
print("|---|---|---|---|")
failed = 0
for line in steps_tsv.read_text().splitlines():
    key, state, secs = line.split("\t")
    try:
        res = results_of[key]() if key in results_of else ""
    except Exception as e:  # a summary must not hide the other rows
        res = f"(could not read the result: {e})"
    failed += state != "ok"
    print(f"| {key} | {state} | {secs} | {res} |")
print(f"\n{'all steps passed' if not failed else f'{failed} step(s) not ok'}; log: gpu_check.log")
sys.exit(1 if failed else 0)
EOF
