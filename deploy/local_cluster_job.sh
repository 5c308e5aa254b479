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
# RAY_DASHBOARD_PORT (8275); RAY_NUM_CPUS (all cores) for the head node.
# RAY_EXTRA_NODES=N (default 0) joins N more worker nodes to the head on the same machine
# (`ray start --address 127.0.0.1:RAY_PORT`), RAY_EXTRA_NODE_CPUS (1) CPUs each, and waits
# until all 1+N nodes are alive before submitting: a real multi-node cluster on one host, to
# try sharding across nodes (pass `--workers` to use them). RAY_KEEP_CLUSTER=1 leaves the
# cluster running afterwards (dashboard, `ray list actors`; end it with `ray stop`).
# Exits with the job's status.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
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
[ "${RAY_KEEP_CLUSTER:-0}" = 1 ] || trap 'ray stop --force >/dev/null 2>&1 || true' EXIT

extra="${RAY_EXTRA_NODES:-0}"
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
for _ in $(seq "$extra"); do  # every node on this host needs its own agent port
    ray start --address "127.0.0.1:$gcs_port" --node-ip-address 127.0.0.1 \
        --num-cpus "${RAY_EXTRA_NODE_CPUS:-1}" --dashboard-agent-listen-port "$(free_port)" \
        --disable-usage-stats >/dev/null
done
if [ "$extra" -gt 0 ]; then
    python "$here/wait_for_cluster.py" --address "127.0.0.1:$gcs_port" \
        --nodes "$((extra + 1))" --timeout 60
fi

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
