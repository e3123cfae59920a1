#!/usr/bin/env bash
# The one script to run on a GPU machine: build the CUDA extension, run the
# CUDA tests and the full test suite, then benchmark gemm_4bit and end-to-end
# decode (pythia-160m- and 1.4b-shaped random models, batch 1 and 8, against
# transformers bf16 and transformers + bitsandbytes NF4 (float16)) on the GPU.
#
#   bash benchmarks/gpu_check.sh                  # every stage
#   bash benchmarks/gpu_check.sh bench            # only some: install cuda-tests tests bench bench-generate
#                                                 #   bench-generate-more profile
#
# On the device tool (15 minutes of device time per issue, start-up included,
# at most 10 per command), one call does the work that needs the GPU; the
# `tests` stage (the whole suite, whose CPU part CI runs anyway) is left out:
#   here, once: mkdir -p .wheels && python3 -m pip download --no-deps --only-binary=:all: \
#       --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 -d .wheels bitsandbytes==0.50.2
#   run(command="PN_COMMIT=<sha> DEADLINE=500 STAGE_TIMEOUT=240 bash benchmarks/gpu_check.sh install cuda-tests bench bench-generate bench-generate-more",
#       carry=[".wheels"], timeout_s=540)
# with <sha> replaced by `git rev-parse --short HEAD` of the tree sent (add
# "+dirty" if it has uncommitted changes): the copy there has no .git, and the
# results' headers name the commit measured from $PN_COMMIT.
# (.wheels/ is ignored by git, so it travels only when carried; the wheel is
# ~43 MB of the 64 MiB a call may carry.) DEADLINE (seconds from the start)
# keeps the whole script inside the call: each stage's limit is cut to what
# is left before it (less a margin for the summary), a stage with under 30 s
# left is skipped, and the stages run in order of value (the targets first:
# the 160m batch-1 decode and its bitsandbytes peer, then the 1.4b batch-1
# decode, are `bench-generate`; `bench-generate-more` is three stages, 160m at
# batch 8, the 1.4b batch-1 peers, 1.4b at batch 8, so a slow 1.4b child cannot
# cost the 160m rows; bench_generate.py rewrites its table after every variant
# and writes what it has when the stage's timeout stops it). `profile` fits a second call
# on the same warm machine; a fresh machine needs `install` again first (the
# build is incremental on a warm one).
#
# Expects the machine's own python3 with torch (CUDA build), nvcc, ninja,
# pytest and transformers; no network (the hub is set offline). The extension
# is built in place (setup.py build_ext --inplace; nothing is installed into
# the image's environment) and found through PYTHONPATH, also by the
# benchmarks' child processes. bitsandbytes (the benchmark's peer) is
# installed from .wheels/bitsandbytes-*.whl into /tmp/site (the device
# README's way) when the repo carries one.
# Results go to $OUT (default benchmarks/results): gemm_4bit_cuda.md,
# generate_cuda.md, profile_cuda.md. Each stage's log goes to $LOG_DIR
# (default build/gpu_check_logs); when $OUT was given (the device tool sets
# it, and brings back at most 8 files from it), the logs are also packed after
# every stage into one file, $OUT/gpu_check_logs.tar.gz, so a run cut off by
# its time limit still returns what it logged. A failing test stage is
# reported but does not stop the benchmark; a failing build does, and so does
# a torch that sees no CUDA GPU (the CUDA tests would all skip and read "ok").
# cuda-tests stops a hung test after 90 s with pytest-timeout where it is
# importable (the device image has it), and goes on without it elsewhere.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PACK_LOGS=0
[ -n "${OUT:-}" ] && PACK_LOGS=1
OUT="${OUT:-$REPO/benchmarks/results}"
LOG_DIR="${LOG_DIR:-$REPO/build/gpu_check_logs}"
# This call's logs only (a warm machine keeps build/ from the call before).
rm -rf "$LOG_DIR"
mkdir -p "$OUT" "$LOG_DIR"
# python3 first: the device image's interpreter with torch is python3.
PY="${PYTHON:-$(command -v python3 || command -v python)}"
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(install cuda-tests tests bench bench-generate bench-generate-more profile)
# No network there: the hub libraries must not wait for a connection.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHIA_NATIVE_CUDA=1
# setup.py refuses a CUDA_HOME (or CUDA_PATH) without bin/nvcc: drop one the
# image may have set to a runtime-only folder, then name the toolkit if it is
# in the usual place (else setup.py looks for a real nvcc on PATH).
for v in CUDA_HOME CUDA_PATH; do
  if [ -n "${!v:-}" ] && [ ! -x "${!v}/bin/nvcc" ]; then echo "ignoring $v=${!v} (no bin/nvcc)"; unset "$v"; fi
done
if [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export PIP_BREAK_SYSTEM_PACKAGES=1  # the machine's own python may be "externally managed"
export PYTHONUNBUFFERED=1

SUMMARY=()
T_ALL=$SECONDS

want() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

# The logs as one file in $OUT (see the header); a no-op without a given $OUT.
# Written beside and renamed, so a kill during tar leaves the last good copy.
pack_logs() {
  [ "$PACK_LOGS" = 1 ] || return 0
  tar -czf "$OUT/.gpu_check_logs.tmp" -C "$LOG_DIR" . 2>/dev/null \
    && mv -f "$OUT/.gpu_check_logs.tmp" "$OUT/gpu_check_logs.tar.gz" || true
}
# Also every 20 s while a stage runs: a stage the call's limit cuts off keeps its log so far.
if [ "$PACK_LOGS" = 1 ]; then
  ( while sleep 20; do pack_logs; done ) &
  PACKER=$!
  trap 'kill "$PACKER" 2>/dev/null || true; pack_logs' EXIT
fi

# stage NAME CMD...: run CMD, log to $LOG_DIR/NAME.log, record time and outcome.
# STAGE_TIMEOUT=seconds bounds each stage (exit 124 = timed out). pytest's exit
# status 5 (nothing collected) counts as "no tests", not as a failure.
# QUIET=1 keeps the output in the log only and shows its last 40 lines.
# DEADLINE=seconds (from the script's start) cuts each stage's limit to what
# is left less 20 s for the summary, and skips a stage with under 30 s left.
stage() {
  local name="$1"; shift
  local t0=$SECONDS rc=0
  local cmd=("$@")
  local limit="${STAGE_TIMEOUT:-}"
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - (SECONDS - T_ALL) - 20))
    if [ "$left" -lt 30 ]; then
      echo "=== [$name] SKIPPED: ${left} s left before DEADLINE=$DEADLINE"
      SUMMARY+=("$(printf '%-20s %-20s %5d s' "$name" "SKIPPED (deadline)" 0)")
      printf '%s\n' "${SUMMARY[@]}" >"$LOG_DIR/summary.txt"
      return 1
    fi
    if [ -z "$limit" ] || [ "$left" -lt "$limit" ]; then limit=$left; fi
  fi
  [ -n "$limit" ] && cmd=(timeout "$limit" "${cmd[@]}")
  echo
  echo "=== [$name] $(date +%T) (limit ${limit:-none} s): $*"
  if [ "${QUIET:-0}" = 1 ]; then
    "${cmd[@]}" >"$LOG_DIR/$name.log" 2>&1 || rc=$?
    tail -n 40 "$LOG_DIR/$name.log"
  else
    "${cmd[@]}" 2>&1 | tee "$LOG_DIR/$name.log" || rc=${PIPESTATUS[0]}
  fi
  local dt=$((SECONDS - t0)) verdict="ok"
  if [ "$rc" -eq 5 ] && [[ "$name" == *tests* ]]; then verdict="no tests collected"
  elif [ "$rc" -eq 124 ]; then verdict="TIMED OUT"
  elif [ "$rc" -ne 0 ]; then verdict="FAILED (exit $rc)"; fi
  echo "=== [$name] $verdict in ${dt} s"
  SUMMARY+=("$(printf '%-20s %-20s %5d s' "$name" "$verdict" "$dt")")
  printf '%s\n' "${SUMMARY[@]}" >"$LOG_DIR/summary.txt"
  pack_logs
  [ "$verdict" = "ok" ] || [ "$verdict" = "no tests collected" ]
}

echo "=== pythia-native gpu_check: $(date -Is) on $(hostname)"
echo "repo $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git')), PN_COMMIT=${PN_COMMIT:-unset}, OUT=$OUT, python=$PY"
[ -n "${PN_COMMIT:-}" ] && export PN_COMMIT  # the benchmarks' headers fall back to it without .git
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-unset} PYTHIA_NATIVE_CUDA=1"
nvidia-smi || echo "nvidia-smi: not available"
# The toolkit setup.py builds with ($CUDA_HOME/bin/nvcc), not whatever nvcc is on PATH.
NVCC="${CUDA_HOME:+$CUDA_HOME/bin/}nvcc"
command -v "$NVCC" >/dev/null && "$NVCC" --version | tail -2 || echo "nvcc: $NVCC not found"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

if want install; then
  shopt -s nullglob
  wheels=(.wheels/bitsandbytes-*.whl .wheels/accelerate-*.whl)
  shopt -u nullglob
  if [ ${#wheels[@]} -gt 0 ]; then
    if stage bnb-wheel "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${wheels[@]}"; then
      export PYTHONPATH="$PYTHONPATH:/tmp/site"
    else
      echo "bitsandbytes wheel did not install: the benchmark runs without its peers"
    fi
  else
    echo "no .wheels/{bitsandbytes,accelerate}-*.whl: the benchmarks' bitsandbytes columns read n/a unless installed"
  fi
  if ! QUIET=1 stage install "$PY" setup.py build_ext --inplace; then
    echo "BUILD FAILED: see $LOG_DIR/install.log"
    printf '%s\n' "${SUMMARY[@]}"
    exit 1
  fi
fi

stage build-info "$PY" -c "import pythia_native, torch; print(pythia_native.build_info()); print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" \
  || { echo "IMPORT FAILED: pythia_native does not load"; printf '%s\n' "${SUMMARY[@]}"; exit 1; }
# Everything after this needs the GPU: without one the CUDA tests would all be
# skipped (and read "ok") and the benchmarks fail. Stop here, and say so.
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo
  echo "=== NO CUDA GPU: torch.cuda.is_available() is False (torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null))."
  echo "=== Stopping after build-info: the CUDA tests and benchmarks (stages: ${STAGES[*]}) did not run."
  SUMMARY+=("$(printf '%-20s %-20s %5d s' no-gpu "STOPPED (no CUDA)" 0)")
  printf '%s\n' "${SUMMARY[@]}" >"$LOG_DIR/summary.txt"
  echo
  echo "=== summary ($((SECONDS - T_ALL)) s in all; logs in $LOG_DIR)"
  printf '%s\n' "${SUMMARY[@]}"
  exit 2
fi

if want cuda-tests; then
  # Not -x: on a first GPU run one early miss must not hide the rest (the
  # engine and graph tests come last). A hung test: pytest-timeout (in the
  # device image) ends it after 90 s with every thread's stack; its thread
  # method, because a hang inside a CUDA call never returns to Python for the
  # signal method to act; it ends the whole pytest run (the tests after it do
  # not run, the stage reads FAILED), so the benchmarks keep their time.
  # Without the plugin, faulthandler only dumps the stacks, and the stage's
  # own limit is what stops it.
  timeout_opts=(-o faulthandler_timeout=120)
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    timeout_opts=(-o timeout=90 -o timeout_method=thread)
  else
    echo "pytest-timeout is not importable: no per-test timeout (a hung test runs to the stage's limit)"
  fi
  stage cuda-tests "$PY" -m pytest -q --maxfail=25 "${timeout_opts[@]}" -p no:cacheprovider tests -m cuda \
    || echo "TESTS FAILED (cuda)"
fi
if want tests; then
  stage tests "$PY" -m pytest -q tests || echo "TESTS FAILED (full suite)"
fi
if want bench; then
  stage bench "$PY" benchmarks/bench_gemm_4bit.py --device cuda --out "$OUT/gemm_4bit_cuda.md" \
    || echo "BENCHMARK FAILED"
fi

# The decode targets first (pythia-160m at batch 1 against transformers +
# bitsandbytes, and the 1.4b bandwidth floor), the rest after: each stage
# appends its own section to generate_cuda.md, rewritten after every variant
# (PARTIAL until done; a timeout's SIGTERM writes what ran), so a deadline
# keeps what ran.
if want bench-generate; then
  stage bench-generate "$PY" benchmarks/bench_generate.py --device cuda --threads 16 --shapes 160m --batch 1 \
    --variants pythia-native-nf4 transformers-bnb-nf4 transformers-bf16 \
    --out "$OUT/generate_cuda.md" || echo "BENCHMARK FAILED (generate)"
  stage bench-generate-1.4b "$PY" benchmarks/bench_generate.py --device cuda --threads 16 --shapes 1.4b --batch 1 \
    --variants pythia-native-nf4 pythia-native-nf4-bf16 \
    --out "$OUT/generate_cuda.md" || echo "BENCHMARK FAILED (generate 1.4b)"
fi
if want bench-generate-more; then
  # By value and cost: 160m at batch 8 (quick), the 1.4b batch-1 peers (the
  # other side of bench-generate-1.4b's rows), then 1.4b at batch 8 (the
  # slowest: a 5.3 GB checkpoint saved and loaded for bitsandbytes).
  stage bench-generate-160m-b8 "$PY" benchmarks/bench_generate.py --device cuda --threads 16 --shapes 160m \
    --batch 8 --variants pythia-native-nf4 pythia-native-nf4-bf16 transformers-bf16 transformers-bnb-nf4 \
    --out "$OUT/generate_cuda.md" || echo "BENCHMARK FAILED (generate 160m, batch 8)"
  stage bench-generate-peers "$PY" benchmarks/bench_generate.py --device cuda --threads 16 --shapes 1.4b \
    --batch 1 --variants transformers-bf16 transformers-bnb-nf4 \
    --out "$OUT/generate_cuda.md" || echo "BENCHMARK FAILED (generate 1.4b peers)"
  stage bench-generate-1.4b-b8 "$PY" benchmarks/bench_generate.py --device cuda --threads 16 --shapes 1.4b \
    --batch 8 --variants pythia-native-nf4 pythia-native-nf4-bf16 transformers-bf16 transformers-bnb-nf4 \
    --out "$OUT/generate_cuda.md" || echo "BENCHMARK FAILED (generate 1.4b, batch 8)"
fi

if want profile; then
  # Where a decode step's GPU time goes, kernel by kernel (and how many kernels a step launches).
  for shape in 160m 1.4b; do
    stage "profile-$shape" "$PY" benchmarks/profile_decode.py --device cuda --shape "$shape" \
      --out "$OUT/profile_cuda.md" || echo "PROFILE FAILED ($shape)"
  done
fi

echo
echo "=== summary ($((SECONDS - T_ALL)) s in all; results in $OUT, logs in $LOG_DIR)"
printf '%s\n' "${SUMMARY[@]}"
if [ -f "$OUT/gemm_4bit_cuda.md" ]; then
  echo
  echo "--- gemm_4bit_cuda.md (summary) ---"
  sed -n '/^Summary:/,$p' "$OUT/gemm_4bit_cuda.md"
fi
if [ -f "$OUT/profile_cuda.md" ]; then
  echo
  echo "--- profile_cuda.md (step times) ---"
  grep -h -e "^## Decode step profile" -e "^Step time" "$OUT/profile_cuda.md"
fi
if [ -f "$OUT/generate_cuda.md" ]; then
  echo
  echo "--- generate_cuda.md ---"
  cat "$OUT/generate_cuda.md"
fi
# Non-zero when any stage failed or was skipped (after everything that could run has run).
! printf '%s\n' "${SUMMARY[@]}" | grep -q -e FAILED -e "TIMED OUT" -e SKIPPED
