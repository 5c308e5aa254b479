#!/usr/bin/env bash
# Start a Ray cluster on 127.0.0.1 (`ray start --head`), submit a `scalecert certify` run to it
# with `ray job submit`, wait for the job, and end the cluster again.
#
#   deploy/local_cluster_job.sh [certify options...]
#   e.g. deploy/local_cluster_job.sh --data ../shared/cifar10-test --model cifar_resnet20 \
#          --checkpoint model.th --patch 2.4% --out runs/cluster
#   deploy/local_cluster_job.sh --end TEMP_DIR     # end a cluster kept with RAY_KEEP_CLUSTER=1
#
# The job runs `scalecert certify ... --address auto` on the head node, so the driver joins
# this cluster instead of starting its own. Environment: RAY_PORT (GCS, default: a free port)
# and RAY_DASHBOARD_PORT (jobs API, default: a free port); RAY_NUM_CPUS (all cores) for the
# head node. RAY_TEMP_DIR: the cluster's own Ray temp dir (default: a new /tmp/rc.XXXXXX,
# removed after a successful run; keep it short, Ray's socket paths must fit in 107 bytes).
# RAY_EXTRA_NODES=N (default 0) joins N more worker nodes to the head on the same machine
# (`ray start --address 127.0.0.1:RAY_PORT`), RAY_EXTRA_NODE_CPUS (1) CPUs each, and waits
# until all 1+N nodes are alive before submitting: a real multi-node cluster on one host, to
# try sharding across nodes (pass `--workers` to use them). RAY_KEEP_CLUSTER=1 leaves the
# cluster running afterwards (dashboard, `ray list actors`) and prints the command that ends it.
# Exits with the job's status.
#
# Other Ray instances on the machine are never touched: the cluster has its own temp dir and
# its own ports (every port `ray start` lets us choose, worker ports included), and it is ended
# by end_cluster below, which signals only this cluster's processes. Never `ray stop`: that ends
# every Ray process of the machine.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# This cluster's processes, one "GROUP PID START-TIME" a line (GROUP: raylet, gcs_server or
# other): every process whose command line names a session dir under the temp dir,
# $temp_dir/session_* (GCS, raylets, dashboard, monitors), its Ray client server (by the GCS
# address Ray wrote to $temp_dir/ray_current_cluster, or by its port) and everything they started
# (agents, workers, the job's driver); never this script, its callers or its own children.
cluster_processes() {
    local gcs
    gcs="$(cat "$temp_dir/ray_current_cluster" 2>/dev/null || true)"
    ps -e -ww -o pid= -o ppid= -o stat= -o lstart= -o args= | CLUSTER_DIR="$temp_dir" \
        CLUSTER_GCS="${gcs:-none}" CLIENT_PORT="${client_port:-none}" SELF="$$" awk '
        $3 !~ /^Z/ { pid = $1; parent[pid] = $2; start[pid] = $4 " " $5 " " $6 " " $7 " " $8
                     prog[pid] = $9; for (i = 1; i <= 8; i++) $i = ""; args[pid] = $0 " " }
        END {
            self = ENVIRON["SELF"]; session = ENVIRON["CLUSTER_DIR"] "/session_"
            by_gcs = " --address=" ENVIRON["CLUSTER_GCS"] " "
            by_port = " --port=" ENVIRON["CLIENT_PORT"] " "
            for (p in parent) if (is_mine(p)) skip[p] = 1  # this script and its children
            for (p = self; p in parent; p = parent[p]) skip[p] = 1  # and its callers
            for (p in args) if (!(p in skip) && (index(args[p], session) \
                    || (index(args[p], " ray.util.client.server ") \
                        && (index(args[p], by_gcs) || index(args[p], by_port)))))
                mark[p] = 1
            do { grew = 0; for (p in parent)
                     if (!(p in mark) && !(p in skip) && parent[p] in mark) { mark[p] = 1; grew = 1 }
            } while (grew)
            for (p in mark) {
                group = "other"
                if (prog[p] ~ /\/raylet$/) group = "raylet"
                if (prog[p] ~ /\/gcs_server$/) group = "gcs_server"
                print group, p, start[p]
            }
        }
        function is_mine(q) { while (q in parent && q != self) q = parent[q]; return q == self }'
}

# Those of the "PID START-TIME" lines in $1 still running: the same PID with the same start time.
still_running() {
    [ -n "$1" ] || return 0
    local pids
    pids="$(cut -d' ' -f1 <<<"$1" | paste -sd,)"
    comm -12 <(sort <<<"$1") <(ps -o pid= -o stat= -o lstart= -p "$pids" 2>/dev/null \
        | awk '$2 !~ /^Z/ { print $1, $3, $4, $5, $6, $7 }' | sort)
}

# End exactly this cluster, in the order `ray stop` uses (raylets, then the rest, the GCS last),
# but only its own processes: each group gets SIGTERM, and SIGKILL for what still runs after
# RAY_END_GRACE seconds (10). Again for any process started meanwhile.
end_cluster() {
    local grace="${RAY_END_GRACE:-10}" round group snapshot procs i
    for round in 1 2 3; do
        snapshot="$(cluster_processes)"
        [ -n "$snapshot" ] || return 0
        for group in raylet other gcs_server; do
            procs="$(still_running "$(awk -v g="$group" '$1 == g { $1 = ""; print substr($0, 2) }' \
                <<<"$snapshot")")"
            [ -n "$procs" ] || continue
            kill -TERM $(cut -d' ' -f1 <<<"$procs") 2>/dev/null || true
            for ((i = 0; i < grace * 5; i++)); do
                [ -n "$(still_running "$procs")" ] || break
                sleep 0.2
            done
            procs="$(still_running "$procs" | cut -d' ' -f1)"
            if [ -n "$procs" ]; then
                echo "SIGKILL to" $procs "(still running ${grace} s after SIGTERM)" >&2
                kill -KILL $procs 2>/dev/null || true
            fi
        done
    done
    [ -z "$(cluster_processes)" ] || { echo "processes of $temp_dir still running" >&2; return 1; }
}

if [ "${1:-}" = --end ]; then
    [ "$#" = 2 ] && [ -d "$2" ] || { echo "usage: $0 --end TEMP_DIR" >&2; exit 2; }
    temp_dir="$(cd "$2" && pwd)"
    end_cluster
    echo "ended the Ray cluster of $temp_dir (its logs stay there)"
    exit 0
fi

bin="$(dirname "$(command -v python)")"
export PATH="$bin:$PATH"
export RAY_USAGE_STATS_ENABLED=0
# A local test cluster without token auth: the jobs API is bound to 127.0.0.1 only.
export RAY_AUTH_MODE=disabled

# N distinct TCP ports, free on every interface right now.
free_ports() {
    python -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}
# The first of N consecutive free ports, in 20000-32767: above Ray's default worker ports
# (10002-19999) and below Linux's ephemeral range, where the OS hands out ports.
free_port_range() {
    python -c 'import random, socket, sys
n = int(sys.argv[1])
for _ in range(200):
    start = random.randrange(20000, 32768 - n)
    socks = []
    try:
        for port in range(start, start + n):
            socks.append(socket.socket()); socks[-1].bind(("", port))
    except OSError:
        continue
    finally:
        for s in socks: s.close()
    print(start); break
else:
    sys.exit("no free range of %d ports in 20000-32767" % n)' "$1"
}

created=0
if [ -n "${RAY_TEMP_DIR:-}" ]; then
    mkdir -p "$RAY_TEMP_DIR"
    temp_dir="$(cd "$RAY_TEMP_DIR" && pwd)"
    if [ -n "$(cluster_processes)" ]; then  # e.g. /tmp/ray: ending those would hit others
        echo "Ray processes already run under $temp_dir;" \
            "give this cluster a temp dir of its own" >&2
        exit 2
    fi
else
    temp_dir="$(mktemp -d /tmp/rc.XXXXXX)"
    created=1
fi
extra="${RAY_EXTRA_NODES:-0}"
per_node="${RAY_WORKER_PORTS:-100}"  # worker ports per node
read -r -a ports <<<"$(free_ports $((3 + 6 * (extra + 1))))"
workers_from="$(free_port_range $((per_node * (extra + 1))))"
gcs_port="${RAY_PORT:-${ports[0]}}"
client_port="${ports[2]}"
dashboard_port="${RAY_DASHBOARD_PORT:-${ports[1]}}"
# node_opts: the temp dir and the ports node $1 of this cluster listens on (node manager,
# object manager, agents, metrics, workers), its own so that it never collides with another Ray.
node_options() {
    local p=$((3 + 6 * $1)) w=$((workers_from + per_node * $1))
    node_opts=(--temp-dir "$temp_dir" --node-ip-address 127.0.0.1
        --node-manager-port "${ports[p]}" --object-manager-port "${ports[p + 1]}"
        --dashboard-agent-listen-port "${ports[p + 2]}"
        --dashboard-agent-grpc-port "${ports[p + 3]}"
        --runtime-env-agent-port "${ports[p + 4]}" --metrics-export-port "${ports[p + 5]}"
        --min-worker-port "$w" --max-worker-port $((w + per_node - 1)))
}
cpus=()
[ -n "${RAY_NUM_CPUS:-}" ] && cpus=(--num-cpus "$RAY_NUM_CPUS")

keep="${RAY_KEEP_CLUSTER:-0}"
on_exit() {
    local rc=$?
    if [ "$keep" = 1 ]; then
        echo "cluster kept (temp dir $temp_dir);" \
            "end it with: $here/local_cluster_job.sh --end $temp_dir"
    else
        end_cluster || rc=1
        if [ "$created" = 1 ] && [ "$rc" = 0 ]; then rm -rf "$temp_dir"
        elif [ "$rc" != 0 ]; then echo "Ray logs: $temp_dir/session_latest/logs" >&2; fi
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

node_options 0
ray start --head --port "$gcs_port" --ray-client-server-port "$client_port" \
    --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" --include-dashboard true \
    "${node_opts[@]}" --disable-usage-stats "${cpus[@]}" >/dev/null

for n in $(seq "$extra"); do
    node_options "$n"
    ray start --address "127.0.0.1:$gcs_port" "${node_opts[@]}" \
        --num-cpus "${RAY_EXTRA_NODE_CPUS:-1}" --disable-usage-stats >/dev/null
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
