#!/usr/bin/env bash
# The SASS of our kernels' streaming loops, without a GPU: instructions per pass (a batch of four
# 16-byte packs a thread) on the common path, per entry (scripts/sass_loops.py says how). From
# the repository root, with nvcc and ptxas on PATH (bash ../shared/cuda/setup.sh ENVFILE && source
# ENVFILE): compiles cuda/cross_entropy.cu as build.rs does, for sm_90 (H100/H200), and
# disassembles it with cuobjdump and nvdisasm from PyPI's NVIDIA wheels (13.2.51: no 13.0 wheel
# exists; they read sm_90 cubins from ptxas 13.0), fetched once into $SASS_TOOLS
# (~/.cache/candle-chunked-ce/sass-tools).
#   bash scripts/sass-loops.sh [ENTRY ...]   (default: the bf16 and f32 forward and backward entries)
# Why it matters: a pass reads 64 bytes a thread, 2 KiB a warp, and each of an SM's four schedulers
# issues one warp instruction a clock. So a pass of n instructions caps a loop at 4 * 2048 / n bytes
# a clock per SM: at 132 SMs and 1.98 GHz (H200), 2.1e15 / n bytes/s, 6.0 TB/s for n = 355 and 8.8 for
# n = 244, against the 4.2 TB/s of its copies; no loop issues every clock, so the count sets how
# much of the stalls the bandwidth can absorb.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${SASS_TOOLS:-$HOME/.cache/candle-chunked-ce/sass-tools}
version=13.2.51
if [ ! -x "$tools/bin/cuobjdump" ] || [ ! -x "$tools/bin/nvdisasm" ]; then
  mkdir -p "$tools/wheels" "$tools/bin"
  python3 -m pip download -q --no-deps -d "$tools/wheels" \
    "nvidia-cuda-cuobjdump==$version" "nvidia-cuda-nvdisasm==$version"
  for wheel in "$tools"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$tools/unpacked"
  done
  for tool in cuobjdump nvdisasm; do
    install -m 755 "$(find "$tools/unpacked" -name "$tool" -type f | head -1)" "$tools/bin/$tool"
  done
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
nvcc -ptx -O3 -std=c++17 -arch=sm_90 cuda/cross_entropy.cu -o "$work/ce.ptx"
ptxas -arch=sm_90 "$work/ce.ptx" -o "$work/ce.cubin"
entries=("$@")
[ ${#entries[@]} -gt 0 ] || entries=(ce_fwd_bf16 ce_fwd_f32 ce_fwd_grad_bf16 ce_fwd_grad_out_bf16 ce_bwd_bf16
  ce_bwd_inplace_bf16 ce_bwd_f32 ce_bwd_inplace_f32)
for entry in "${entries[@]}"; do
  PATH="$tools/bin:$PATH" cuobjdump -sass -fun "$entry" "$work/ce.cubin" >"$work/$entry.sass"
  python3 scripts/sass_loops.py "$work/$entry.sass" "$entry"
done
