#!/usr/bin/env bash
# Every GPU check in one call, on the lent GPU machine, from the repository root, with
# gpu-bin/ carried (built here by scripts/build-gpu-bins.sh). Prints the GPU facts, runs
# the whole test suite with the `cuda` feature, our GPU table, and PyTorch's eager and
# torch.compile cross-entropy on the same card (scripts/torch_ce_bench.py), then the linear
# cross-entropy against PyTorch's matmul + cross-entropy (scripts/torch_linear_ce_bench.py).
# Everything it prints is also saved in $OUT (the folder the run tool brings back; gpu-out/
# when unset) as gpu-check.log, beside compute-sanitizer's full reports.
set -u
out_dir=${OUT:-gpu-out}
mkdir -p "$out_dir"
exec > >(tee "$out_dir/gpu-check.log") 2>&1
tee_pid=$!
source scripts/gpu-env.sh gpu-bin
export CHUNKED_CE_REQUIRE_CUDA=1   # a CUDA test that cannot get the GPU fails here, it does not skip
status=0
for t in gpu-bin/*; do
  case "$(basename "$t")" in gpu_table|*.xz) continue ;; esac
  echo "== tests: $t"
  "$t" --test-threads=1 || status=1
done
# Shared-memory races (racecheck) and barriers not reached by every thread (synccheck) in our
# kernels, over the CUDA variants of the parity tests: every kernel, both block shapes (a warp
# per row for small vocabularies, a block per row above), in place, and bf16 -- at sizes the
# sanitizer's slowdown allows.
echo "== compute-sanitizer over gpu-bin/parity's CUDA tests"
sanitizer=$(command -v compute-sanitizer || true)
for dir in "${CUDA_HOME:-}/bin" /usr/local/cuda/bin; do
  if [ -z "$sanitizer" ] && [ -x "$dir/compute-sanitizer" ]; then sanitizer=$dir/compute-sanitizer; fi
done
if [ -z "$sanitizer" ]; then
  echo "compute-sanitizer: not on PATH, in \$CUDA_HOME/bin or in /usr/local/cuda/bin; racecheck and synccheck not run"
else
  for tool in racecheck synccheck; do
    log="$out_dir/compute-sanitizer-$tool.log"
    "$sanitizer" --tool "$tool" --error-exitcode 1 --log-file "$log" gpu-bin/parity cuda --test-threads=1 \
      >"$out_dir/compute-sanitizer-$tool.tests.log" 2>&1
    code=$?
    [ "$code" -eq 0 ] || status=1
    echo "$tool: exit $code, report $log, the tests' output beside it"
    grep -E 'SUMMARY|Error|Hazard' "$log" | sort | uniq -c | head -20
  done
fi
echo "== ours (gpu_table)"
gpu-bin/gpu_table "$@" || status=1
echo "== PyTorch on the same card"
"${TORCH_VENV:-/opt/torch/.venv}/bin/python" scripts/torch_ce_bench.py \
  --shapes 8192x32000,8192x128256,16384x128256,8192x262144 --dtypes bf16,f32 || status=1
echo "== linear cross-entropy, ours (gpu_table --linear) and PyTorch's, 8192x4096x128256 bf16"
gpu-bin/gpu_table --linear 8192x4096x128256 --reps 5 || status=1
"${TORCH_VENV:-/opt/torch/.venv}/bin/python" scripts/torch_linear_ce_bench.py \
  --shape 8192x4096x128256 --dtype bf16 --reps 5 || status=1
# Let tee finish writing gpu-check.log before the run ends.
exec >&- 2>&-
wait "$tee_pid"
exit $status
