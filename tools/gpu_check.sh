#!/usr/bin/env bash
# Prove and measure every GPU path in minutes, offline. Writes gpu_check.json and prints a summary.
#
#   tools/gpu_check.sh [--out DIR]               run the check on this machine's GPU (~5 min on an H200)
#   tools/gpu_check.sh --dry-run [--out DIR]     the same script on the CPU with tiny sizes (no GPU needed)
#   tools/gpu_check.sh --bundle DIR              (where the package index is reachable) download the wheels
#                                                a GPU node lacks, split into <= 60 MB pieces + SHA256SUMS
#   tools/gpu_check.sh --wheels DIR [...]        (on the GPU node, no network) reassemble, verify, install,
#                                                then run the check
# Options: --install-only (with --wheels: install, no check), --python PY (interpreter to install into and run with; default python3),
#          --packages "SPEC ..." (what --bundle fetches; default: DALI for CUDA 13 and the project's
#          pure-Python needs), --piece-size SIZE (split(1) syntax, default 60M), --target-python 3.12.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py=python3 out=gpu_check mode=check bundle="" wheels="" piece_size=60M target_py=3.12
packages="nvidia-dali-cuda130==2.4.0 webdataset tqdm"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) mode=dry ;;
    --bundle) mode=bundle; bundle="$2"; shift ;;
    --wheels) wheels="$2"; shift ;;
    --out) out="$2"; shift ;;
    --python) py="$2"; shift ;;
    --packages) packages="$2"; shift ;;
    --install-only) mode=install ;;
    --piece-size) piece_size="$2"; shift ;;
    --target-python) target_py="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$mode" = bundle ]; then
  mkdir -p "$bundle/wheels"
  # Wheels for the GPU node's platform (x86-64 Linux, CPython $target_py), with their dependencies.
  "$py" -m pip download -q --only-binary=:all: --python-version "$target_py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$bundle/wheels" $packages
  rm -rf "$bundle/pieces"; mkdir -p "$bundle/pieces"
  (cd "$bundle/wheels" && sha256sum *.whl > ../WHEELS.SHA256SUMS)
  for w in "$bundle"/wheels/*.whl; do
    split -b "$piece_size" -d -a 3 "$w" "$bundle/pieces/$(basename "$w").part-"
  done
  (cd "$bundle/pieces" && sha256sum * > ../PIECES.SHA256SUMS)
  rm -rf "$bundle/wheels"
  echo "bundle: $(ls "$bundle/pieces" | wc -l) pieces of <= $piece_size in $bundle/pieces" \
       "($(du -sh "$bundle/pieces" | cut -f1)); copy $bundle over, then: tools/gpu_check.sh --wheels $bundle"
  exit 0
fi

if [ -n "$wheels" ]; then
  (cd "$wheels/pieces" && sha256sum --quiet -c ../PIECES.SHA256SUMS) \
    || { echo "gpu_check.sh: $wheels/pieces: a piece is missing or corrupt (PIECES.SHA256SUMS)" >&2; exit 1; }
  rm -rf "$wheels/wheels"; mkdir -p "$wheels/wheels"
  for first in "$wheels"/pieces/*.part-000; do
    name="$(basename "${first%.part-000}")"
    cat "$wheels/pieces/$name".part-* > "$wheels/wheels/$name"
  done
  (cd "$wheels/wheels" && sha256sum --quiet -c ../WHEELS.SHA256SUMS) \
    || { echo "gpu_check.sh: $wheels: a reassembled wheel does not match WHEELS.SHA256SUMS" >&2; exit 1; }
  "$py" -m pip install -q --no-index --find-links "$wheels/wheels" $(cd "$wheels/wheels" && ls *.whl | sed 's/-.*//' | sort -u)
  echo "installed: $(cd "$wheels/wheels" && ls *.whl | tr '\n' ' ')"
  [ "$mode" = install ] && exit 0
fi

cd "$here"
args=(--json "$out/gpu_check.json")
[ "$mode" = dry ] && args+=(--dry-run)
mkdir -p "$out"
PYTHONUNBUFFERED=1 "$py" -m tools.bench gpu "${args[@]}" 2>&1 | tee "$out/gpu_check.txt"
