#!/usr/bin/env bash
# One scheduled robustness audit, run as a RayJob entrypoint on the Ray head:
#
#   audit.sh ROOT [scalecert certify options...]
#   e.g. audit.sh s3://scalecert-audits/resnet50/imagenet-val --data s3://datasets/imagenet/val \
#          --synsets s3://datasets/imagenet/synsets.txt --model resnet50 \
#          --checkpoint s3://models/resnet50/current.pth --patch 2% --device cuda --workers 4
#
# 1. certifies into a fresh folder ROOT/runs/<UTC time> (`scalecert certify --address auto`);
# 2. reduces it with `scalecert report`, comparing against the last audit that passed
#    (`--against PREV --max-drop $MAX_DROP`): the report exits non-zero when certified accuracy
#    fell by more than MAX_DROP percentage points, and so does this script, the Ray job, the
#    RayJob (jobStatus FAILED) and the Kubernetes Job of the CronJob that started it;
# 3. only then records the run as passed: ROOT/passed/<UTC time> holds the run's location.
#    A failed audit never becomes the baseline, so a drop keeps failing until someone looks.
#
# Environment: MAX_DROP (percentage points, default 1.0); ARCHIVE (s3://... prefix for
# `scalecert report --archive`, optional); WAIT_GPUS (wait for this many GPUs in the cluster
# first, optional); RUN_NAME (default: the UTC time, e.g. 20260101T020000Z). ROOT may be a
# local folder or s3://bucket/prefix (endpoint and credentials as for scalecert itself).
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 ROOT [scalecert certify options...]" >&2
    exit 2
fi
root="${1%/}"
shift
run="${RUN_NAME:-$(date -u +%Y%m%dT%H%M%SZ)}"
out="$root/runs/$run"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The newest marker under ROOT/passed/ names the baseline run (empty: first audit).
previous="$(python - "$root/passed" <<'PY'
import sys
from pyarrow import fs as pafs
from pipeline.io.storage import resolve
fs, path = resolve(sys.argv[1])
infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
if names:
    with fs.open_input_stream(f"{path}/{names[-1]}") as f:
        print(f.read().decode().strip())
PY
)"

if [ -n "${WAIT_GPUS:-}" ]; then
    python "$here/../wait_for_cluster.py" --gpus "$WAIT_GPUS" --timeout "${WAIT_TIMEOUT:-1200}"
fi

echo "audit $run: certifying into $out (baseline: ${previous:-none})"
scalecert certify --quiet --address auto "$@" --out "$out"

report=("$out")
if [ -n "$previous" ]; then
    report+=(--against "$previous" --max-drop "${MAX_DROP:-1.0}")
fi
if [ -n "${ARCHIVE:-}" ]; then
    report+=(--archive "$ARCHIVE")
fi
scalecert report "${report[@]}"

python - "$root/passed/$run" "$out" <<'PY'
import posixpath
import sys
from pipeline.io.storage import resolve
fs, path = resolve(sys.argv[1])
fs.create_dir(posixpath.dirname(path), recursive=True)
with fs.open_output_stream(path) as f:
    f.write(sys.argv[2].encode())
PY
echo "audit $run: passed"
