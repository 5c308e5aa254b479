#!/usr/bin/env bash
# Certify EfficientNet-Lite0 (ImageNet weights from the registry, nothing fine-tuned) on the 220
# photos of ../shared/data/imagenet-sample through the pipeline, as in docs/REPRODUCTION.md:
#   1. lay the photos out as <synset>/<file> under $WORK/data (the label is the synset's index
#      in synsets.txt)
#   2. scalecert certify with the model as file:examples/efficientnet_lite0.py:build and its
#      preprocessing (short side 256 bicubic, centre crop 224, ImageNet mean and std), patches of
#      1%, 2% and 3% (23, 32, 39 px), 6 x 6 windows: masking and scalecert at top-k 0.15 in one
#      run, patchcleanser at 2% on the first $PC_IMAGES photos (every pair of windows runs:
#      n^2/2 model runs per image), and scalecert at top-k 0.5 and 1.0 in two more runs
#   3. scalecert report for each run; bench/imagenet_table.py prints the table
# Every step is resumable. Environment: SHARED (../shared), WORK (runs/reproduce-imagenet),
# PC_IMAGES (20), WORKERS (1).
set -euo pipefail
cd "$(dirname "$0")/.."

SHARED=${SHARED:-../shared}
WORK=${WORK:-runs/reproduce-imagenet}
PC_IMAGES=${PC_IMAGES:-20}
WORKERS=${WORKERS:-1}
SCALECERT=${SCALECERT:-.venv/bin/scalecert}
SOURCE=$SHARED/data/imagenet-sample
[ -f "$SOURCE/synsets.txt" ] || { echo "reproduce-imagenet: missing $SOURCE (set SHARED=...)" >&2; exit 1; }

mkdir -p "$WORK/data"
for photo in "$SOURCE"/*.JPEG; do
  name=$(basename "$photo")
  mkdir -p "$WORK/data/${name%%_*}"
  [ -f "$WORK/data/${name%%_*}/$name" ] || cp "$photo" "$WORK/data/${name%%_*}/$name"
done

MODEL=(--model file:examples/efficientnet_lite0.py:build --input-size 224 --resize 256
       --interpolation bicubic --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225)
COMMON=(--data "$WORK/data" --synsets "$SOURCE/synsets.txt" "${MODEL[@]}"
        --masks-per-axis 6 --shard-size 20 --workers "$WORKERS" --quiet)
PATCHES=(--patch 1% --patch 2% --patch 3%)

certify() {  # certify NAME OPTIONS...: one run, then its report
  local name=$1; shift
  local start=$SECONDS
  "$SCALECERT" certify "${COMMON[@]}" --out "$WORK/$name" "$@"
  echo -e "$name\t$((SECONDS - start))" >> "$WORK/timings.tsv"
  "$SCALECERT" report "$WORK/$name" > /dev/null
}

certify k15 "${PATCHES[@]}" --method masking --method scalecert --top-k 0.15
certify patchcleanser --patch 2% --method patchcleanser --limit "$PC_IMAGES"
certify k50 "${PATCHES[@]}" --method scalecert --top-k 0.5
certify k100 "${PATCHES[@]}" --method scalecert --top-k 1.0
