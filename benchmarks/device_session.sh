#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent GPU machine with no network (issues 19, 21):
#
#   bash benchmarks/device_session.sh study   # the R²MAE study on one GPU (study-gpu.yaml), timed
#   bash benchmarks/device_session.sh bench   # tests/test_gpu.py, then bench_pretrain's GPU section
#   bash benchmarks/device_session.sh embed   # bench_embed on the GPU (cells/s, streaming RSS)
#
# What it expects beside the checkout, prepared on a machine with network (docs/studies.md, "The study on one GPU"):
#   .whl/      wheels of biomask's dependencies that the GPU image lacks (deepspeed, anndata, scanpy,
#              pydantic, biopython, igraph, ...), for that machine's Python
#   .devdata/  the registry datasets the study reads (BIOMASK_DATA_DIR layout: <name>/<file>)
# The machine's own torch (a CUDA build) is used as it is: this also checks biomask on a CUDA torch
# it did not install. Results go to $OUT (default ./device-out): JSON and logs, small enough to copy.
set -u
MODE=${1:-study}
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
START=$(date +%s)
say() { echo "[$(($(date +%s) - START)) s] $*"; }

# -- the environment: the image's python3 and torch, plus the carried wheels
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >"$OUT/pip-$MODE.log" 2>&1 || { say "pip install failed"; tail "$OUT/pip-$MODE.log"; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export BIOMASK_DATA_DIR=${BIOMASK_DATA_DIR:-$PWD/.devdata}
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
unset DS_ACCELERATOR  # biomask decides: the GPU torch sees (the first log line of each run says so)
python3 - >"$OUT/environment-$MODE.json" <<'EOF'
import json, platform
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
for name in ("deepspeed", "transformers", "anndata", "scanpy", "pydantic", "numpy", "sklearn"):
    try:
        info[name] = __import__(name).__version__
    except Exception as exc:  # a missing wheel: named here, and the step that needs it fails below
        info[name] = f"missing: {exc}"
print(json.dumps(info, indent=1))
EOF
cat "$OUT/environment-$MODE.json"

case "$MODE" in
study)
  RUN=runs/study-gpu
  say "study-gpu.yaml: start"
  T=$(date +%s)
  timeout "${STUDY_TIMEOUT:-450}" python3 -m biomask pipeline run configs/pipelines/study-gpu.yaml >"$OUT/study.log" 2>&1
  CODE=$?
  pkill -f "python3 -m biomask" 2>/dev/null  # a timed-out pipeline's running stages
  say "study-gpu.yaml: exit $CODE after $(($(date +%s) - T)) s"
  echo "{\"exit\": $CODE, \"wall_s\": $(($(date +%s) - T))}" >"$OUT/study-time.json"
  # what the report and the verdicts rest on: the report, each run's record and metrics, the logs
  tar czf "$OUT/study.tar.gz" --exclude='*.safetensors' --exclude='checkpoints' --exclude='*.npy' \
    --exclude='*.h5ad' --exclude='shard-*' --exclude='events.out.*' "$RUN" 2>/dev/null
  ls -la "$OUT"
  tail -30 "$OUT/study.log"
  ;;
bench)
  say "GPU tests: start"  # the device decision, bf16, and a GPU-trained model reloaded on the CPU
  timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    tests/test_accelerator.py >"$OUT/gpu-tests.log" 2>&1
  say "GPU tests: exit $?"
  tail -5 "$OUT/gpu-tests.log"
  say "bench_pretrain --device cuda: start"
  timeout "${BENCH_TIMEOUT:-420}" python3 -m benchmarks.bench_pretrain --device cuda --tokens char \
    --repeats 1 --out "$OUT/pretrain-gpu.json" >"$OUT/bench.log" 2>&1
  # the --out copy is written at the end only; a run cut short leaves its per-arm lines in bench.log
  say "bench: exit $?"
  tail -40 "$OUT/bench.log"
  ;;
embed)
  say "bench_embed --device cuda: start"  # needs pbmc3k and ce2-chrX in .devdata
  timeout "${BENCH_TIMEOUT:-300}" python3 -m benchmarks.bench_embed --device cuda >"$OUT/bench-embed.log" 2>&1
  say "bench_embed: exit $?"
  cp bench-results/embed-gpu.json "$OUT/" 2>/dev/null
  tail -30 "$OUT/bench-embed.log"
  ;;
*)
  echo "usage: $0 study|bench|embed" >&2
  exit 2
  ;;
esac
say "done"
