#!/usr/bin/env bash
# Prove and measure every GPU path in minutes, offline. Writes gpu_check.json and prints a summary.
#
#   tools/dev/gpu_check.sh [--out DIR]               run the check on this machine's GPU (<= 8 min on an H200)
#   tools/dev/gpu_check.sh --dry-run [--out DIR]     the same script on the CPU with tiny sizes (no GPU needed)
#   tools/dev/gpu_check.sh --bundle DIR              (where the package index is reachable) download the wheels a
#                                                GPU node lacks, split them into pieces and pack the pieces into
#                                                transfer folders DIR/transfer-NN of <= 60 MB, each with the checksums
#   tools/dev/gpu_check.sh --wheels DIR [--wheels DIR2 ...]   (on the GPU node, no network) collect the pieces from
#                                                every folder below the DIRs, verify each sha256, name what is
#                                                missing, reassemble, install (--no-deps), then run the check
# Options: --install-only (with --wheels: install, no check), --python PY (interpreter to install into and run
#          with; default: the project's .venv, made with --system-site-packages on the node if it has none, so
#          that it sees the node's torch and pip never meets an externally managed system Python),
#          --cuda 12|13 (the GPU node's CUDA major version: which DALI build --bundle fetches; default 12, whose
#          build runs on drivers R525.60 and later, R580 included; 13 needs R580+), --packages "SPEC ..." (what
#          --bundle fetches instead; default: DALI for --cuda, webdataset), --skip "NAME ..." (wheels --bundle
#          leaves out because the node has them; default: numpy six packaging), --transfer-size SIZE (bytes per
#          transfer folder, default 60M; pieces are as large), --target-python 3.12, --study-epochs N (epochs
#          per variant in the check's recipe study; 0 skips it).
# Before installing and before the check, the node's driver is read (nvidia-smi; NVIDIA_SMI names another)
# and a DALI build it cannot run, or one beside another DALI build, is refused in one line.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
py="" out=gpu_check mode=check bundle="" wheels=() transfer_size=60M target_py=3.12 study_epochs="" cuda=12
packages=""
skip="numpy six packaging"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) mode=dry ;;
    --bundle) mode=bundle; bundle="$2"; shift ;;
    --wheels) wheels+=("$2"); shift ;;
    --out) out="$2"; shift ;;
    --python) py="$2"; shift ;;
    --packages) packages="$2"; shift ;;
    --cuda) cuda="$2"; shift ;;
    --skip) skip="$2"; shift ;;
    --install-only) mode=install ;;
    --transfer-size|--piece-size) transfer_size="$2"; shift ;;
    --target-python) target_py="$2"; shift ;;
    --study-epochs) study_epochs="$2"; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

to_bytes() { numfmt --from=iec "$1"; }

case "$cuda" in 12|13) ;; *) echo "gpu_check.sh: --cuda takes 12 or 13, not $cuda" >&2; exit 2 ;; esac
[ -n "$packages" ] || packages="nvidia-dali-cuda${cuda}0==2.4.0 webdataset"
if [ -z "$py" ]; then  # the project's own environment, never whatever python3 the PATH holds
  if [ "$mode" = bundle ]; then py=python3
  else
    if [ ! -x "$here/.venv/bin/python" ] && [ ${#wheels[@]} -gt 0 ]; then
      python3 -m venv --system-site-packages "$here/.venv"
    fi
    py="$here/.venv/bin/python"; [ -x "$py" ] || py=python3
  fi
fi
[ "$mode" = bundle ] || echo "python: $py"
installed_dali() {  # the DALI distributions the interpreter has
  "$py" -c "import importlib.metadata as m; print(' '.join(sorted({d.metadata['Name'] for d in m.distributions() if (d.metadata['Name'] or '').lower().replace('_', '-').startswith('nvidia-dali-cuda')})))"
}

if [ "$mode" = bundle ]; then
  rm -rf "$bundle"; mkdir -p "$bundle/.wheels" "$bundle/.pieces"
  # Wheels for the GPU node's platform (x86-64 Linux, CPython $target_py), with their dependencies.
  "$py" -m pip download -q --only-binary=:all: --python-version "$target_py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$bundle/.wheels" $packages
  for name in $skip; do  # what the node already has: pip normalizes names to underscores in file names
    rm -f "$bundle/.wheels/${name//-/_}"-[0-9]*.whl "$bundle/.wheels/$name"-[0-9]*.whl
  done
  (cd "$bundle/.wheels" && sha256sum *.whl > ../WHEELS.SHA256SUMS)
  limit=$(to_bytes "$transfer_size")
  piece=$(( limit * 15 / 16 ))  # room for the checksum files beside the pieces
  for w in "$bundle"/.wheels/*.whl; do
    split -b "$piece" -d -a 3 "$w" "$bundle/.pieces/$(basename "$w").part-"
  done
  (cd "$bundle/.pieces" && sha256sum * > ../PIECES.SHA256SUMS)
  # Pack the pieces into as few transfer folders of <= $transfer_size as first-fit decreasing finds.
  used=()
  while IFS= read -r f; do
    size=$(stat -c %s "$f") k=0
    while [ $k -lt ${#used[@]} ] && [ $(( used[k] + size )) -gt "$piece" ]; do k=$((k + 1)); done
    [ $k -lt ${#used[@]} ] || used+=(0)
    used[k]=$(( used[k] + size ))
    dir="$bundle/transfer-$(printf %02d $((k + 1)))"
    mkdir -p "$dir"
    mv "$f" "$dir/"
  done < <(ls -S "$bundle"/.pieces/* )
  n=${#used[@]}
  for dir in "$bundle"/transfer-*; do cp "$bundle/PIECES.SHA256SUMS" "$bundle/WHEELS.SHA256SUMS" "$dir/"; done
  rm -rf "$bundle/.wheels" "$bundle/.pieces" "$bundle/PIECES.SHA256SUMS" "$bundle/WHEELS.SHA256SUMS"
  echo "bundle: $n transfer folders of <= $transfer_size in $bundle ($(du -sh "$bundle" | cut -f1)):" \
       $(cd "$bundle" && ls -d transfer-*)
  echo "send each folder in its own call (they may land in different places), then:" \
       "tools/dev/gpu_check.sh --wheels FOLDER [--wheels FOLDER2 ...]"
  exit 0
fi

if [ ${#wheels[@]} -gt 0 ]; then
  work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
  sums="$(find "${wheels[@]}" -name PIECES.SHA256SUMS -print -quit)"
  [ -n "$sums" ] || { echo "gpu_check.sh: no PIECES.SHA256SUMS below ${wheels[*]}" >&2; exit 1; }
  wheel_sums="$(realpath "$(dirname "$sums")")/WHEELS.SHA256SUMS"
  missing=()
  mkdir -p "$work/pieces" "$work/wheels"
  while read -r hash name; do  # every listed piece, from wherever it landed, checked before use
    found=""
    while IFS= read -r cand; do
      if [ "$(sha256sum "$cand" | cut -d' ' -f1)" = "$hash" ]; then found="$cand"; break; fi
    done < <(find "${wheels[@]}" -name "$name" -type f)
    if [ -n "$found" ]; then ln -sf "$(realpath "$found")" "$work/pieces/$name"; else missing+=("$name"); fi
  done < "$sums"
  if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu_check.sh: ${#missing[@]} piece(s) missing or corrupt below ${wheels[*]}: ${missing[*]}" >&2
    exit 1
  fi
  for first in "$work"/pieces/*.part-000; do
    name="$(basename "${first%.part-000}")"
    cat "$work/pieces/$name".part-* > "$work/wheels/$name"
  done
  (cd "$work/wheels" && sha256sum --quiet -c "$wheel_sums") \
    || { echo "gpu_check.sh: a reassembled wheel does not match $wheel_sums" >&2; exit 1; }
  # The driver must run the bundled DALI build, and no other DALI build may be there already.
  (cd "$here" && "$py" -m tools.dev.bench.driver check "$work"/wheels/*.whl --installed $(installed_dali)) || exit 2
  # --no-deps: the bundle holds what the node lacks; what it has (numpy, ...) stays as it is.
  "$py" -m pip install -q --no-index --no-deps "$work"/wheels/*.whl
  echo "installed: $(cd "$work/wheels" && ls *.whl | tr '\n' ' ')"
  [ "$mode" = install ] && exit 0
fi

cd "$here"
"$py" -m tools.dev.bench.driver check --installed $(installed_dali) || exit 2
args=(--json "$out/gpu_check.json")
[ "$mode" = dry ] && args+=(--dry-run)
[ -n "$study_epochs" ] && args+=(--study-epochs "$study_epochs")
mkdir -p "$out"
PYTHONUNBUFFERED=1 "$py" -m tools.dev.bench gpu "${args[@]}" 2>&1 | tee "$out/gpu_check.txt"
