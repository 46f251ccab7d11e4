#!/usr/bin/env bash
# Every GPU check in one call, on the lent GPU machine, from the repository root, with
# gpu-bin/ carried (built here by scripts/build-gpu-bins.sh). Prints the GPU facts, runs
# the whole test suite with the `cuda` feature, our GPU table, and PyTorch's eager and
# torch.compile cross-entropy on the same card (scripts/torch_ce_bench.py), then the linear
# cross-entropy against PyTorch's matmul + cross-entropy (scripts/torch_linear_ce_bench.py).
set -u
source scripts/gpu-env.sh gpu-bin
export CHUNKED_CE_REQUIRE_CUDA=1   # a CUDA test that cannot get the GPU fails here, it does not skip
status=0
for t in gpu-bin/*; do
  case "$(basename "$t")" in gpu_table|*.xz) continue ;; esac
  echo "== tests: $t"
  "$t" --test-threads=1 || status=1
done
echo "== ours (gpu_table)"
gpu-bin/gpu_table "$@" || status=1
echo "== PyTorch on the same card"
"${TORCH_VENV:-/opt/torch/.venv}/bin/python" scripts/torch_ce_bench.py \
  --shapes 8192x32000,8192x128256,16384x128256,8192x262144 --dtypes bf16,f32 || status=1
echo "== linear cross-entropy, ours (gpu_table --linear) and PyTorch's, 8192x4096x128256 bf16"
gpu-bin/gpu_table --linear 8192x4096x128256 --reps 5 || status=1
"${TORCH_VENV:-/opt/torch/.venv}/bin/python" scripts/torch_linear_ce_bench.py \
  --shape 8192x4096x128256 --dtype bf16 --reps 5 || status=1
exit $status
