#!/usr/bin/env bash
# Produce the released reference sets (sets/README.md) by name, with `python -m dsdm` only: no Ray,
# MLflow, Optuna or jsonschema needed, so it runs on a bare GPU box with torch + torchvision.
#
#   scripts/release_sets.sh [--data-root DIR] [--device auto|cpu|cuda] [--python PY] OUT NAME...
#   scripts/release_sets.sh --print NAME...     # the one-line command of each set, nothing run
#
# Each NAME lands in OUT/NAME/: NAME.pt (the set), NAME.manifest.json (how it was made and what it
# scored: `distill --evaluate`), NAME.png (its image grid). The distillation checkpoint goes to a
# temporary folder, so OUT holds only what is released. Zoos are cached in $DSDM_CACHE as usual.
set -euo pipefail

NAMES="digits-ipc10 mnist-ipc10 fashionmnist-ipc10 fashionmnist-ipc1-lambda-search fashionmnist-ipc1-paper-lambda"

# The distill flags of each released set (data root, device and output are added below).
flags_of() {
    case "$1" in
        digits-ipc10) echo "--dataset digits --ipc 10 --budget cpu --seed 0" ;;
        mnist-ipc10) echo "--dataset mnist --ipc 10 --budget cpu --seed 0" ;;
        fashionmnist-ipc10) echo "--dataset fashionmnist --ipc 10 --budget cpu --seed 0" ;;
        # the λ search's winner by validation accuracy and the paper's defaults (docs/results.md, λ search at resolve)
        fashionmnist-ipc1-lambda-search) echo "--dataset fashionmnist --ipc 1 --budget resolve --seed 0 --lambda1 12.96 --lambda2 0.87" ;;
        fashionmnist-ipc1-paper-lambda) echo "--dataset fashionmnist --ipc 1 --budget resolve --seed 0 --lambda1 50 --lambda2 0.2" ;;
        *) echo "release_sets.sh: unknown set '$1'; choose from: $NAMES" >&2; return 2 ;;
    esac
}

PY=python DATA_ROOT="" DEVICE=auto PRINT=0 OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --data-root) DATA_ROOT="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --print) PRINT=1; shift ;;
        -h|--help) sed -n '2,11p' "$0"; echo "sets: $NAMES"; exit 0 ;;
        *) break ;;
    esac
done
if [ "$PRINT" = 0 ]; then
    [ $# -ge 2 ] || { echo "usage: $0 [--data-root DIR] [--device DEV] [--python PY] OUT NAME...; sets: $NAMES" >&2; exit 2; }
    OUT="$1"; shift
fi
[ $# -ge 1 ] || { echo "release_sets.sh: name at least one set: $NAMES" >&2; exit 2; }
for name in "$@"; do flags_of "$name" >/dev/null || exit 2; done  # every name checked before any run

data_flags() {  # digits ships with scikit-learn; the others read torchvision's layout under --data-root
    case "$1" in digits-*) echo "--offline" ;; *) echo "--data-root ${DATA_ROOT:-data} --offline" ;; esac
}

for name in "$@"; do
    set_file="${OUT:-sets}/$name/$name.pt"
    cmd="python -m dsdm distill $(flags_of "$name") $(data_flags "$name") --evaluate --out $set_file"
    if [ "$PRINT" = 1 ]; then echo "$cmd"; continue; fi
    mkdir -p "$OUT/$name"
    tmp=$(mktemp -d)
    echo "== $name: $cmd --device $DEVICE" >&2
    start=$(date +%s)
    # shellcheck disable=SC2086  # the flags are words
    "$PY" -m dsdm distill $(flags_of "$name") $(data_flags "$name") --evaluate --device "$DEVICE" \
        --checkpoint "$tmp/$name.ckpt" --out "$set_file"
    "$PY" -m dsdm show "$set_file" --out "$OUT/$name/$name.png"
    rm -rf "$tmp"
    echo "== $name: done in $(( $(date +%s) - start )) s" >&2
done
