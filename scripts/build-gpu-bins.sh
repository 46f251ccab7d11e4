#!/usr/bin/env bash
# Builds, on the CPU-only machine, everything scripts/gpu-check.sh runs on a lent GPU:
# the release test binaries with the `cuda` feature and the `gpu_table` bench, stripped
# and xz-compressed into gpu-bin/ (git-ignored), as ../shared/cuda/README.md explains.
# Then: run tool, carry ["gpu-bin"], command `bash scripts/gpu-check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
env_file=$(mktemp)
bash ../shared/cuda/setup.sh "$env_file" >/dev/null
# shellcheck disable=SC1090
source "$env_file"
rm -rf gpu-bin && mkdir -p gpu-bin
binaries=$(cargo test --release --features cuda --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] in (["lib"], ["test"]):
        print(m["executable"])')
bench=$(cargo bench --features cuda --bench gpu_table --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])')
for b in $binaries $bench; do
  name=$(basename "$b" | sed 's/-[0-9a-f]\{16\}$//')
  strip -o "gpu-bin/$name" "$b"
  xz -f -T0 "gpu-bin/$name"
done
ls -la gpu-bin
