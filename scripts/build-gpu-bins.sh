#!/usr/bin/env bash
# Builds, on the CPU-only machine, everything scripts/gpu-check.sh runs on a lent GPU
# (../shared/cuda/README.md): with the `cuda` feature, in the release profile, the test
# binaries (lib + integration tests), the `gpu_table` bench and the `finetune_gpt2`
# example; strips them and packs them as ONE solid xz archive, whose 512 MiB dictionary
# spans several binaries, so the ~30 MB of candle PTX/fatbin that each one holds is stored
# once (20 binaries, 911 MiB stripped -> 13.2 MiB; ~9 min of xz here). Writes, in gpu-bin/
# (git-ignored):
#   bins.tar.xz   the stripped binaries, named without cargo's -<hash> suffix
#   LIST          their names, one a line
#   MANIFEST_DIR  the repository root that env!("CARGO_MANIFEST_DIR") baked into them
#                 (scripts/gpu-env.sh links it to the checkout on the GPU machine)
#   COMMIT        the commit they were built from (`+dirty` with uncommitted changes or
#                 untracked files) and the PTX target, written last, once the archive is whole
#                 and fits (scripts/gpu-env.sh prints it into the check's log)
# A gpu-bin/ already built from the clean HEAD for the same PTX target is kept as it is
# (`--force` rebuilds): it can be built ahead of a lease. Unpacking it (gpu-env.sh) removes
# bins.tar.xz, so a gpu-bin/ that a dry run of gpu-check.sh unpacked here is rebuilt.
# Then: run tool, carry ["gpu-bin"] (and ".whl" for Liger), command
# `bash scripts/gpu-check.sh`. CARGO_TARGET_DIR defaults to the one .ci/run uses.
set -euo pipefail
shopt -s inherit_errexit   # a failed cargo inside $(...) stops the script too
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/candle-chunked-ce/target}"
export CARGO_TERM_COLOR=never
max_mib=40

env_file=$(mktemp)
stage=$(mktemp -d "${TMPDIR:-/tmp}/gpu-bin-stage.XXXXXX")
trap 'rm -rf "$env_file" "$stage"' EXIT
bash ../shared/cuda/setup.sh "$env_file" >/dev/null
# shellcheck disable=SC1090
source "$env_file"
# What the binaries are built from: the commit and the PTX target.
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if ! changes=$(git status --porcelain 2>/dev/null); then
  commit=unknown
elif [ -n "$changes" ]; then
  commit="$commit+dirty"
fi
stamp="$commit sm_${CUDA_COMPUTE_CAP:-auto}"
if [ "${1:-}" != --force ] && [ -f gpu-bin/bins.tar.xz ] && [[ $commit != *+dirty && $commit != unknown ]] &&
  [ "$(cat gpu-bin/COMMIT 2>/dev/null)" = "$stamp" ]; then
  echo "build-gpu-bins: gpu-bin/ already holds the binaries of $stamp (--force rebuilds)"
  exit 0
fi

# Each cargo run's JSON messages -> "path<TAB>manifest_path" of the executables wanted.
executables() {
  python3 -c 'import json, sys
kinds = set(sys.argv[1].split(","))
for line in sys.stdin:
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and kinds & set(m["target"]["kind"]):
        print(m["executable"] + "\t" + m["manifest_path"])' "$1"
}
# This checkout's own units are always rebuilt (about 2 minutes here). The shared target dir may
# hold them from another checkout, a CI clone or a worktree, and cargo takes those as fresh here:
# the same metadata hash, and the sources compared by their paths relative to the package, by
# mtime. They may then be built from other sources, and bake that checkout's path as
# env!("CARGO_MANIFEST_DIR"), where the fixture tests look on the GPU machine (2026-12-05: a CI
# clone's test binaries were about to be packed). Touching the build script reruns it (the
# kernels' PTX), touching the library's root rebuilds it and everything that links it.
touch build.rs src/lib.rs
# Cargo's progress and errors go to stderr, as usual; set -o pipefail catches a failed build.
artifacts=$(
  cargo test --release --features cuda --no-run --message-format=json | executables lib,test
  cargo bench --features cuda --bench gpu_table --no-run --message-format=json | executables bench
  cargo build --release --features cuda --example finetune_gpt2 --message-format=json | executables example
)
[ -n "$artifacts" ] || { echo "build-gpu-bins: cargo reported no executables" >&2; exit 1; }

manifest_dirs=$(cut -f2 <<<"$artifacts" | xargs -n1 dirname | sort -u)
[ "$(wc -l <<<"$manifest_dirs")" -eq 1 ] || { echo "build-gpu-bins: several manifest dirs: $manifest_dirs" >&2; exit 1; }
# rustc's dep-info beside each hashed binary names the CARGO_MANIFEST_DIR it baked in: none other.
while IFS=$'\t' read -r path _; do
  baked=$(sed -n 's/^# env-dep:CARGO_MANIFEST_DIR=//p' "$path.d" 2>/dev/null | sort -u)
  if [ -n "$baked" ] && [ "$baked" != "$manifest_dirs" ]; then
    echo "build-gpu-bins: $path was built in $baked, not $manifest_dirs" >&2
    exit 1
  fi
done <<<"$artifacts"

names=()
while IFS=$'\t' read -r path _; do
  name=$(basename "$path" | sed 's/-[0-9a-f]\{16\}$//')
  [ ! -e "$stage/$name" ] || { echo "build-gpu-bins: two binaries named $name" >&2; exit 1; }
  strip -o "$stage/$name" "$path"
  names+=("$name")
done <<<"$artifacts"

rm -rf gpu-bin && mkdir -p gpu-bin
printf '%s\n' "${names[@]}" >gpu-bin/LIST
printf '%s\n' "$manifest_dirs" >gpu-bin/MANIFEST_DIR
(cd "$stage" && ls -l "${names[@]}")
stripped=$(du -cb "$stage"/* | tail -1 | cut -f1)
echo "build-gpu-bins: ${#names[@]} binaries, $((stripped / 1048576)) MiB stripped; compressing (xz -9e, one thread, a few minutes)"
start=$(date +%s)
tar cf - -C "$stage" "${names[@]}" | xz -9e --lzma2=preset=9e,dict=512MiB -T1 >gpu-bin/bins.tar.xz
ls -l gpu-bin
total=$(du -cb gpu-bin/* | tail -1 | cut -f1)
echo "build-gpu-bins: gpu-bin/ holds $total bytes ($((total / 1048576)) MiB, limit $max_mib MiB) after $(($(date +%s) - start)) s of xz; manifest dir $manifest_dirs"
if [ "$total" -gt $((max_mib * 1048576)) ]; then
  echo "build-gpu-bins: gpu-bin/ is over $max_mib MiB: it would not fit in one run's 64 MiB carry with the checkout" >&2
  exit 1
fi
# Last, once the archive is whole and fits: what a later run may keep without rebuilding.
printf '%s\n' "$stamp" >gpu-bin/COMMIT
