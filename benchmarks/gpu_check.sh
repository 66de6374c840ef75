#!/usr/bin/env bash
# The one prepared command for a lent GPU (one H200, ~15 minutes of device time in all, start-up included).
# Finishes in under 8 minutes (TOTAL_S, default 450 s): parts that would not fit are skipped and listed.
#
#   1. installs what the device image lacks from the carried .whl/ (bitsandbytes, deepspeed, the pinned
#      transformers/peft, liger-kernel);
#   2. runs the tests marked `gpu` (tests/test_gpu.py): QLoRA bf16 NF4 training under DeepSpeed with the loss
#      falling, resume, merge and greedy equality; a right-padded batch on SDPA's FlashAttention backend;
#      FlashAttention-2 = SDPA and Liger = plain where importable; torch.compile (inductor) = eager; DPO on
#      packed pairs (bf16, NF4 base) starting at ln 2 with the loss falling; our greedy decoding loop = generate()
#      on CUDA, and so are the web demo's live replies, with caches kept on the GPU; --engine vllm = --engine torch where the image has vLLM (its wheel is too big to carry: without
#      it the test is listed as skipped);
#   3. runs benchmarks/bench_gpu.py: workloads R, D, L on a random Baichuan2-7B-shaped model against the
#      recipe (docs/PERFORMANCE.md, "GPU check");
#   4. prints what it skipped. Results under $OUT: gpu_check.log, gpu_tests.log, bench_gpu.md, bench_gpu.json.
#
# On the CPU machine, once per session, from the repository root (puts ~61 MB of wheels in .whl/, ignored):
#   bash ../shared/gpu/fetch_wheels.sh liger-kernel==0.8.5
#   du -cb $(git ls-files) .whl | tail -1        # what travels: must stay under 64 MiB (67108864 bytes)
# Then the device call (the `run` tool):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Without a GPU, the same steps at tiny sizes on the CPU (no install; the gpu tests skip), ~20 s of CPU time:
#   bash benchmarks/gpu_check.sh --dry-run          # tests/test_gpu_check.py runs this in CI
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
elif [ -n "${1:-}" ]; then
  echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2
  exit 2
fi
TOTAL_S=${TOTAL_S:-450}
OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT"
start=$(date +%s)
elapsed() { echo $(($(date +%s) - start)); }
skipped=()
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

main() {
  # 1. install --------------------------------------------------------------------------------------------------
  if [ "$dry_run" = 1 ]; then
    PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
    skipped+=("install from .whl/ (dry run)")
    echo "== dry run: $PYTHON, CPU, tiny sizes"
  else
    PYTHON=${PYTHON:-python3}
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
    if ! bash .whl/install_on_device.sh; then
      echo "gpu_check: installing .whl/ failed: run ../shared/gpu/fetch_wheels.sh liger-kernel==0.8.5 on the CPU machine and pass carry [\".whl\"]" >&2
      return 1
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    echo "== installed in $(elapsed) s"
  fi
  "$PYTHON" -c "import vllm; print('== vllm', vllm.__version__)" 2>/dev/null || echo "== vllm: not installed"

  # 2. the gpu tests ----------------------------------------------------------------------------------------------
  tests_budget=$((TOTAL_S * 2 / 5))
  timeout "$tests_budget" "$PYTHON" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu_tests.log"
  tests_rc=${PIPESTATUS[0]}
  if [ "$tests_rc" = 124 ]; then
    skipped+=("the gpu tests after ${tests_budget} s (timed out; see gpu_tests.log for those that ran)")
  fi
  while IFS= read -r line; do skipped+=("test: ${line#SKIPPED }"); done < <(grep '^SKIPPED' "$OUT/gpu_tests.log")
  echo "== gpu tests: exit $tests_rc, $(elapsed) s"

  # 3. the benchmark ----------------------------------------------------------------------------------------------
  bench_budget=$((TOTAL_S - $(elapsed) - 15))
  if [ "$bench_budget" -lt 60 ]; then
    skipped+=("benchmark (only ${bench_budget} s left)")
    bench_rc=0
  else
    bench_flags=(--out "$OUT" --budget_s "$bench_budget")
    [ "$dry_run" = 1 ] && bench_flags+=(--dry-run)
    "$PYTHON" benchmarks/bench_gpu.py "${bench_flags[@]}" 2>&1 | tee "$OUT/bench.log"
    bench_rc=${PIPESTATUS[0]}
    while IFS= read -r line; do
      [ "$line" != "skipped: nothing" ] && skipped+=("benchmark: ${line#skipped: }")
    done < <(grep '^skipped: ' "$OUT/bench.log")
    rm -f "$OUT/bench.log"  # its table and numbers are in bench_gpu.md/.json, its log in gpu_check.log
  fi

  # 4. summary ----------------------------------------------------------------------------------------------------
  echo
  echo "== gpu_check done in $(elapsed) s (budget ${TOTAL_S} s): tests exit ${tests_rc}, benchmark exit ${bench_rc}"
  if [ ${#skipped[@]} -eq 0 ]; then
    echo "skipped: nothing"
  else
    echo "skipped:"
    printf '  - %s\n' "${skipped[@]}"
  fi
  [ -f "$OUT/bench_gpu.md" ] && cat "$OUT/bench_gpu.md"
  if [ "$tests_rc" != 0 ] && [ "$tests_rc" != 5 ]; then return "$tests_rc"; fi  # 5: no test collected
  return "$bench_rc"
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
