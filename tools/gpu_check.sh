#!/usr/bin/env bash
# One prepared GPU check for mmft, within 9 minutes on a CUDA machine:
#   1. install GPU FAISS (faiss-gpu-cu12, else faiss-cuda; both link CUDA 12's cuBLAS, ~0.6 GB of
#      nvidia-cublas-cu12 wheel) and any missing Python dependency, from a folder of wheels when there
#      is no network (default .whl/); with no GPU FAISS, faiss-cpu goes back in for the tests,
#   2. run the gpu-marked tests (Triton loss kernels, CUDA training with and without gradient
#      caching, GPU FAISS, pinned batches),
#   3. tools/bench_loss.py: bf16, B 16k..262k, D 512, time and peak memory against open_clip's
#      ClipLoss / SigLipLoss (they OOM where B x B logits do not fit: reported as OOM),
#   4. tools/bench_index.py: FAISS GPU index build and search beside the CPU figures (skipped, and
#      reported so, when FAISS sees no GPU),
#   5. tools/gpu_report.py: OUT/gpu_check.json and OUT/gpu_check.md (and --docs docs/gpu_check.md).
# Every step has its own time limit; a step that fails or times out is reported and the next one runs.
#
#   tools/gpu_check.sh [--out DIR] [--wheels DIR] [--docs] [--dry-run]
#
# --dry-run: the CPU-sized version (tiny B, CPU FAISS, no installs); tests/test_gpu_check.py runs it.
# To carry wheels to an offline GPU machine (Python 3.12, x86_64), on a machine with a network:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d .whl faiss-gpu-cu12 open_clip_torch timm webdataset braceexpand pytest
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="$ROOT/runs/gpu_check"
WHEELS="$ROOT/.whl"
DRY=0
DOCS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --docs) DOCS="$ROOT/docs/gpu_check.md"; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
: > "$OUT/steps.tsv"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT" || exit 1

HAS_GPU_FAISS="import faiss, sys; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)"  # exit 0: FAISS sees a GPU
DEADLINE=$((SECONDS + 540))  # every step together within 9 minutes, start-up and report included

# skip NAME REASON: record a step that was not run and why (steps.tsv status "skipped").
skip() {
  echo "skipped: $2" > "$OUT/$1.log"
  printf '%s\tskipped\t0.0\n' "$1" >> "$OUT/steps.tsv"
  echo "== $1 skipped: $2" >&2
}

# step NAME SECONDS CMD...: run CMD within its limit and the time left, log its output, record
# its exit status (124: out of time) and seconds in steps.tsv.
step() {
  local name="$1" limit="$2"; shift 2
  local start rc left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  start=$(date +%s.%N)
  if [ "$limit" -lt 5 ]; then
    echo "not run: the 9-minute budget is spent" > "$OUT/$name.log"
    rc=124
  else
    echo "== $name (limit ${limit}s)" >&2
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
  fi
  awk -v n="$name" -v rc="$rc" -v a="$start" -v b="$(date +%s.%N)" \
    'BEGIN { printf "%s\t%s\t%.1f\n", n, rc, b - a }' >> "$OUT/steps.tsv"
  tail -n 3 "$OUT/$name.log" >&2
  return $rc
}

# pip_install PKG...: from the wheel folder when it exists (no network needed), else from the index;
# the installed torch is pinned so that nothing can replace it (a new torch is gigabytes).
pip_install() {
  local pin="$OUT/pin.txt"
  "$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$pin"
  if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q -c "$pin" --no-index --find-links "$WHEELS" "$@" && return 0
  fi
  "$PY" -m pip install -q --retries 1 --timeout 10 -c "$pin" "$@"
}

install_deps() {
  local missing=""
  for pair in open_clip:open_clip_torch timm:timm webdataset:webdataset braceexpand:braceexpand \
              yaml:pyyaml safetensors:safetensors PIL:pillow pytest:pytest torchvision:torchvision \
              transformers:transformers tqdm:tqdm matplotlib:matplotlib; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing="$missing ${pair#*:}"
  done
  [ -z "$missing" ] || pip_install $missing || echo "could not install:$missing" >&2
  "$PY" -c "$HAS_GPU_FAISS" 2>/dev/null && return 0
  local order="faiss-gpu-cu12 faiss-cuda"  # both need CUDA 12's runtime and cuBLAS, also under a CUDA 13 torch
  local online=0
  "$PY" -c "import socket; socket.create_connection(('pypi.org', 443), timeout=3)" 2>/dev/null && online=1
  for pkg in $order; do
    # only where a wheel is at hand: faiss-cpu is not removed for an install that cannot happen
    ls "$WHEELS/${pkg//-/_}"-*.whl > /dev/null 2>&1 || [ "$online" = 1 ] || continue
    "$PY" -m pip uninstall -q -y faiss-cpu > /dev/null 2>&1
    if pip_install "$pkg" && "$PY" -c "$HAS_GPU_FAISS"; then
      echo "installed $pkg" >&2
      return 0
    fi
  done
  echo "no GPU FAISS could be installed ($order: no wheel in ${WHEELS}, or the install failed; online=$online)" >&2
  # the tests and the CPU rows still need FAISS: put the CPU build back
  "$PY" -c "import faiss" 2>/dev/null || pip_install faiss-cpu || echo "could not install faiss-cpu" >&2
  return 1
}

write_env() {
  "$PY" - "$OUT/env.json" "$DRY" <<'EOF'
import json, sys
env = {"dry_run": sys.argv[2] == "1"}
try:
    import torch
    env.update(torch=torch.__version__, cuda=torch.version.cuda,
               gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
except ImportError:
    env["torch"] = None
for mod in ("triton", "faiss"):
    try:
        env[mod] = __import__(mod).__version__
    except ImportError:
        env[mod] = None
try:
    import faiss
    env["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
except ImportError:
    env["faiss_gpus"] = None
json.dump(env, open(sys.argv[1], "w"), indent=1)
EOF
}

GPU_TESTS=$(grep -l "pytest.mark.gpu" tests/*.py | tr '\n' ' ')
if [ "$DRY" = 1 ]; then
  write_env
  step gpu_tests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu $GPU_TESTS
  cp "$OUT/gpu_tests.log" "$OUT/pytest.txt"
  step loss_bench 150 "$PY" tools/bench_loss.py --device cpu --dtypes float32 --batch-sizes 256 --dims 32 \
    --one-process --repeat 1 --budget 120 --json "$OUT/loss.jsonl"
  step index_bench 90 "$PY" tools/bench_index.py --sets separated --sizes 4000 --targets 0.9 --queries 200 \
    --train-sample 4000 --gpu --json "$OUT/index.jsonl"
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: torch sees no CUDA device; use --dry-run for the CPU-sized check" >&2
    exit 1
  fi
  export PY WHEELS OUT HAS_GPU_FAISS
  export -f pip_install install_deps
  step install 60 bash -c install_deps
  write_env
  # 164 s on an H200 (2026-11-29), most of it Triton compiling and autotuning per shape
  step gpu_tests 210 "$PY" -m pytest -q -p no:cacheprovider -m gpu $GPU_TESTS
  cp "$OUT/gpu_tests.log" "$OUT/pytest.txt"
  # bf16 at D=512 (fp16 and the fp32 reference are the tests' business); the quick peers run first
  # so that the budget they leave rolls over to Triton, whose autotuning at B=262,144 takes ~40 s
  step loss_bench 190 "$PY" tools/bench_loss.py --device cuda --dtypes bfloat16 \
    --batch-sizes 16384,65536,262144 --dims 512 --impls open_clip,chunked,triton \
    --one-process --repeat 2 --budget 180 --json "$OUT/loss.jsonl"
  if "$PY" -c "$HAS_GPU_FAISS" 2>/dev/null; then
    step index_bench 150 "$PY" tools/bench_index.py --sets overlapping --sizes 1000000 --targets 0.9 0.95 \
      --hnsw-max 0 --gpu --json "$OUT/index.jsonl"
  else  # CPU rows alone are docs/indexes.md's business, not this check's
    skip index_bench "FAISS sees no GPU (see install.log)"
  fi
fi
"$PY" tools/gpu_report.py "$OUT" ${DOCS:+--docs "$DOCS"} > /dev/null
echo "gpu_check: $OUT/gpu_check.json and $OUT/gpu_check.md" >&2
awk -F'\t' '$2 != 0 && $2 != "skipped" {bad = 1} END {exit bad}' "$OUT/steps.tsv"
