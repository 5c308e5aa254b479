#!/usr/bin/env bash
# Start a Ray cluster on 127.0.0.1 (`ray start --head`), submit a `scalecert certify` run to it
# with `ray job submit`, wait for the job, and stop the cluster again.
#
#   deploy/local_cluster_job.sh [certify options...]
#   e.g. deploy/local_cluster_job.sh --data ../shared/cifar10-test --model cifar_resnet20 \
#          --checkpoint model.th --patch 2.4% --out runs/cluster
#
# The job runs `scalecert certify ... --address auto` on the head node, so the driver joins
# this cluster instead of starting its own. Environment: RAY_PORT (default 6390) and
# RAY_DASHBOARD_PORT (8275); RAY_NUM_CPUS (all cores). Exits with the job's status.
set -euo pipefail

bin="$(dirname "$(command -v python)")"
export PATH="$bin:$PATH"
export RAY_USAGE_STATS_ENABLED=0
# A local test cluster without token auth: the jobs API is bound to 127.0.0.1 only.
export RAY_AUTH_MODE=disabled
gcs_port="${RAY_PORT:-6390}"
dashboard_port="${RAY_DASHBOARD_PORT:-8275}"
cpus=()
[ -n "${RAY_NUM_CPUS:-}" ] && cpus=(--num-cpus "$RAY_NUM_CPUS")

ray start --head --node-ip-address 127.0.0.1 --port "$gcs_port" \
    --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" --include-dashboard true \
    --disable-usage-stats "${cpus[@]}" >/dev/null
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT

address="http://127.0.0.1:$dashboard_port"
for _ in $(seq 60); do  # the jobs API comes up a little after the head node
    ray job list --address "$address" >/dev/null 2>&1 && break
    sleep 1
done

job="scalecert-$(date +%s)-$$"
ray job submit --address "$address" --submission-id "$job" -- \
    scalecert certify --quiet --address auto "$@"
status="$(ray job status --address "$address" "$job" 2>&1 | grep -oiE 'succeeded|failed|stopped' \
    | tail -n 1 | tr '[:lower:]' '[:upper:]')"
echo "job $job: ${status:-UNKNOWN}"
[ "$status" = SUCCEEDED ]
