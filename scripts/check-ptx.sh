#!/usr/bin/env bash
# Checks our CUDA kernels without a GPU, from the repository root, with nvcc and
# ptxas on PATH (CI: ../shared/cuda/setup.sh): compiles cuda/cross_entropy.cu to
# PTX as build.rs does, for sm_90 (H100/H200, the lent GPUs), then
# - every entry whose name contains fwd or bwd issues 16-byte global loads
#   (ld.global[.nc].v4 of 32-bit or .v2 of 64-bit elements);
# - no entry reads a buffer it writes through the non-coherent cache
#   (ld.global.nc): a pointer the kernel both reads and writes (the logits of
#   the forward with gradient and of the in-place backward) must reach it
#   writable, not as `const T* __restrict__`. Each global load and store is
#   traced back through the address arithmetic to the pointer parameter it
#   derives from;
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
python3 - "$work/ce.ptx" <<'PY' || status=1
import re, sys

REG = re.compile(r"%[a-z]+\d+")
ADDRESS = re.compile(r"\[(%rd\d+)(?:\+-?\d+)?\]")


def unpredicated(line):
    return re.sub(r"^@!?%p\d+\s+", "", line.strip())


def traced(body):
    """The pointer parameters (by index) each global store and non-coherent load addresses."""
    lines = [unpredicated(l) for l in body.splitlines()]
    param_of = {}
    for line in lines:
        m = re.match(r"ld\.param\.u64\s+(%rd\d+),\s*\[\w+_param_(\d+)\]", line)
        if m:
            param_of[m.group(1)] = int(m.group(2))
    # A register derives from pointer parameter k if it is cvta.to.global of k's value, or
    # computed (not loaded) from one that does; loops need the fixed point.
    taint, changed = {}, True
    while changed:
        changed = False
        for line in lines:
            op = line.split(None, 1)[0] if line else ""
            if op.startswith(("ld.", "st.", "atom.", "red.", "bra", "ret", "setp", "bar", "shfl", "//", ".", "$")):
                continue
            regs = REG.findall(line)
            if len(regs) < 2:
                continue
            dst, srcs = regs[0], regs[1:]
            if op.startswith("cvta.to.global") and srcs[0] in param_of:
                new = {param_of[srcs[0]]}
            else:
                new = set().union(*(taint.get(s, set()) for s in srcs))
            if new - taint.get(dst, set()):
                taint[dst] = taint.get(dst, set()) | new
                changed = True
    written, nc_read = set(), set()
    for line in lines:
        m = ADDRESS.search(line)
        if not m:
            continue
        params = taint.get(m.group(1), set())
        if re.match(r"(st|atom|red)\.global", line):
            written |= params
        elif re.match(r"ld\.global\.nc", line):
            nc_read |= params
    return written, nc_read


status = 0
ptx = open(sys.argv[1]).read()
for part in re.split(r"(?m)^(?=\.visible \.entry )", ptx)[1:]:
    name = re.match(r"\.visible \.entry (\w+)", part).group(1)
    written, nc_read = traced(part)
    if not written:
        print(f"FAIL {name}: no global store traced to a pointer parameter")
        status = 1
    elif written & nc_read:
        print(f"FAIL {name}: ld.global.nc of parameter(s) {sorted(written & nc_read)}, which it writes")
        status = 1
    else:
        print(f"ok   {name}: writes parameter(s) {sorted(written)}; none of them read through ld.global.nc")
sys.exit(status)
PY
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
