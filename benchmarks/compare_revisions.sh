#!/usr/bin/env bash
# Run one benchmark command for the code at another revision and for this working tree, in
# the same run, so "no slower than before" is measured beside its baseline.
#
#   bash benchmarks/compare_revisions.sh [--rounds N] BASE -- COMMAND [ARGS...]
#
# BASE is a git revision (its tree is exported with `git archive` into a temporary folder) or
# a folder that already holds the tree of one (for machines without the git history, such as
# the lent GPU machine: `git archive bd7285d | tar -x -C base_tree` on this side first).
# COMMAND runs in the root of each tree, so `benchmarks/bench_tiers.py` is that tree's own
# version of the script, with `keras_hps` imported from that tree: a site folder per tree
# (keras_hps plus its mapped subpackages, as benchmarks/device_env.sh builds) goes first on
# PYTHONPATH, ahead of any installed or editable keras_hps. The trees take turns, N rounds
# (default 1), alternating which goes first. Output: each run's lines under a header
# `=== <tree> (round i/N) ===`.
#
# Examples (repository root):
#   flock /tmp/keras-hps-cpu.lock bash benchmarks/compare_revisions.sh --rounds 2 bd7285d -- \
#       .venv/bin/python benchmarks/bench_tiers.py --only host
#   source benchmarks/device_env.sh; bash benchmarks/compare_revisions.sh base_tree -- \
#       python3 benchmarks/bench_gpu_cache.py --only query,fused
set -euo pipefail

rounds=1
if [[ "${1:-}" == "--rounds" ]]; then
  rounds="$2"
  shift 2
fi
if [[ $# -lt 3 || "$2" != "--" ]]; then
  echo "usage: $0 [--rounds N] BASE -- COMMAND [ARGS...]" >&2
  exit 2
fi
base="$1"
shift 2

here="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/keras-hps-compare.XXXXXX")"
trap 'rm -rf "$work"' EXIT

if [[ -d "$base" ]]; then
  base_tree="$(cd "$base" && pwd)"
  base_name="$base"
else
  base_tree="$work/base"
  mkdir -p "$base_tree"
  git -C "$here" archive "$base" | tar -x -C "$base_tree"
  base_name="$base"
  short="$(git -C "$here" rev-parse --short "$base")"
  [[ "$short" == "$base"* ]] || base_name="$base ($short)"
fi

# site_for TREE SITE: a folder importable as keras_hps, built from TREE
site_for() {
  mkdir -p "$2/keras_hps"
  cp -r "$1/keras_hps/." "$2/keras_hps/"
  local sub
  for sub in triton_kernels export serving; do
    ln -s "$1/$sub" "$2/keras_hps/$sub"
  done
}
site_for "$base_tree" "$work/site_base"
site_for "$here" "$work/site_head"

run() {  # run TREE SITE LABEL ROUND
  echo "=== $3 (round $4/$rounds) ==="
  (cd "$1" && PYTHONPATH="$2:${PYTHONPATH:-}" PYTHONSAFEPATH=1 "${command[@]}")
}

command=("$@")
if [[ "${command[0]}" == */* && -x "${command[0]}" ]]; then  # e.g. .venv/bin/python: as called
  command[0]="$(cd "$(dirname "${command[0]}")" && pwd)/$(basename "${command[0]}")"
fi
status=0
for ((i = 1; i <= rounds; i++)); do
  if ((i % 2)); then
    run "$base_tree" "$work/site_base" "$base_name" "$i" || status=$?
    run "$here" "$work/site_head" "working tree" "$i" || status=$?
  else
    run "$here" "$work/site_head" "working tree" "$i" || status=$?
    run "$base_tree" "$work/site_base" "$base_name" "$i" || status=$?
  fi
done
exit "$status"
