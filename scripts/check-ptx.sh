#!/usr/bin/env bash
# Checks our CUDA kernels without a GPU, from the repository root, with nvcc and
# ptxas on PATH (CI: ../shared/cuda/setup.sh): compiles cuda/cross_entropy.cu to
# PTX as build.rs does, for sm_90 (H100/H200, the lent GPUs), then
# - every entry whose name contains fwd or bwd issues 16-byte global loads
#   (ld.global[.nc].v4 of 32-bit or .v2 of 64-bit elements);
# - ptxas -v reports 0 spill bytes for every entry.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-sm_90}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
nvcc -ptx -O3 -std=c++17 "-arch=$arch" cuda/cross_entropy.cu -o "$work/ce.ptx"
status=0
entries=$(grep -oE '^\.visible \.entry [A-Za-z0-9_]+' "$work/ce.ptx" | awk '{print $3}')
[ -n "$entries" ] || { echo "no kernel entries in the PTX"; exit 1; }
for entry in $entries; do
  case "$entry" in *fwd*|*bwd*) ;; *) continue ;; esac
  # The entry's body: from its .entry line to the next .entry (or the end).
  vector_loads=$(awk -v e="$entry" '
    /^\.visible \.entry / { inside = ($3 == e || $3 == e "(") }
    inside && /ld\.global(\.nc)?\.v(4\.(u32|f32|b32)|2\.(f64|u64|b64))/ { n++ }
    END { print n + 0 }' "$work/ce.ptx")
  if [ "$vector_loads" -eq 0 ]; then
    echo "FAIL $entry: no 16-byte global loads"
    status=1
  else
    echo "ok   $entry: $vector_loads 16-byte global loads"
  fi
done
ptxas -v "-arch=$arch" "$work/ce.ptx" -o "$work/ce.cubin" 2> "$work/ptxas.log"
spills=$(grep -cE '[1-9][0-9]* bytes spill (stores|loads)' "$work/ptxas.log" || true)
grep -E 'Compiling entry|registers' "$work/ptxas.log" | paste - - | sed -E 's/ptxas info +: //g; s/Compiling entry function //' |
  awk '{print "     " $0}'
if [ "$spills" -ne 0 ]; then
  echo "FAIL ptxas reports spills:"
  grep -E 'Compiling entry|spill' "$work/ptxas.log"
  status=1
else
  echo "ok   ptxas ($arch): 0 spill bytes in every entry"
fi
exit $status
