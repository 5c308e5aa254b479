"""The deployment files are valid and invoke real `scalecert` commands and options: the Ray
cluster launcher config (against the installed Ray's schema and config preparation), the
KubeRay manifests, the GPU Dockerfile and the audit script (run with a stub `scalecert`)."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
AUDIT_SH = KUBERAY / "audit.sh"
SHELL_OPERATORS = {"&&", "||", ";", "|"}


def cluster_config() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


# --- ray_cluster.yaml ---------------------------------------------------------------------------

def test_ray_cluster_yaml_validates_against_rays_launcher_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(cluster_config(), schema)


def test_ray_cluster_yaml_survives_rays_offline_config_preparation() -> None:
    """prepare_config merges the AWS defaults (a packaged YAML, no AWS call) and fills per-type
    min/max workers; validate_config re-checks the schema and the worker bounds."""
    pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster_config()))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_setup_commands"][: len(cluster_config()["setup_commands"])] \
        == cluster_config()["setup_commands"]


def test_ray_cluster_has_a_cpu_head_and_autoscaling_gpu_workers() -> None:
    config = cluster_config()
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert config["cluster_name"]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_workers = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, "no worker node type with GPUs"
    for name, node_type in gpu_workers.items():
        assert re.match(r"^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5)\.", node_type["node_config"]["InstanceType"])
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name
        # The driver sizes its pool from the GPUs present at start: keep one GPU node up.
        assert node_type["min_workers"] >= 1, name
        assert "--gpus all" in node_type["docker"]["worker_run_options"]
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


def test_ray_cluster_docker_image_and_setup_commands() -> None:
    config = cluster_config()
    docker = config["docker"]
    assert docker["container_name"] and re.fullmatch(r"[^:\s]+:\d+\.\d+\.\d+", docker["image"])
    assert not docker["image"].endswith(":latest")
    assert "PLACEHOLDER" in (REPO / "ray_cluster.yaml").read_text()  # the image name is marked
    setup = " ".join(config["setup_commands"])
    assert re.search(r"pip install .*-c \S*constraints\.txt", setup), setup
    assert "scalecert[pipeline]" in setup
    # the checkout that setup_commands installs is mounted, without the local virtualenv
    assert "/home/ray/scalecert" in config["file_mounts"]
    assert ".venv" in config["rsync_exclude"]


# --- Dockerfile ---------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)  # continuation lines
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_the_package_on_a_pinned_cuda_base() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        assert ":" in image and not re.search(r":latest\b", image), image
        assert "gpu" in image or "cuda" in image, image
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert re.search(r"pip install .*torch==\$\{TORCH_VERSION\}.*download\.pytorch\.org/whl/", runs)
    assert re.search(r'pip install -c \S*constraints\.txt "?\S*scalecert\[pipeline\]', runs)
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG")
    constraints = (REPO / "constraints.txt").read_text()
    assert f"torch=={args['TORCH_VERSION']}" in constraints  # the GPU image pins the same torch
    ray_pin = re.search(r"^ray==(\S+)", constraints, re.M).group(1)
    assert f"ray:{ray_pin}-" in froms[0]  # the base image's Ray is the pinned one
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert any(word in {"CMD", "ENTRYPOINT"} for word, _ in instructions)
    assert "latest" not in " ".join(rest for _, rest in instructions)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# --- KubeRay manifests --------------------------------------------------------------------------

def kuberay_documents() -> list[tuple[str, dict]]:
    """Every document of every YAML file under deploy/kuberay, plus YAML files embedded in
    ConfigMaps (the audit's RayJob template)."""
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            docs.append((path.name, doc))
            if doc.get("kind") == "ConfigMap":
                for key, value in doc.get("data", {}).items():
                    if key.endswith((".yaml", ".yml")):
                        docs += [(f"{path.name}:{key}", d) for d in yaml.safe_load_all(value) if d]
    return docs


def test_every_kuberay_manifest_parses_and_has_the_basic_fields() -> None:
    docs = kuberay_documents()
    assert {name for name, _ in docs} >= {"rayjob-certify.yaml", "raycronjob-audit.yaml"}
    for name, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), name
        meta = doc.get("metadata", {})
        assert meta.get("name") or meta.get("generateName"), name


def rayjobs() -> list[tuple[str, dict]]:
    jobs = [(name, doc) for name, doc in kuberay_documents() if doc["kind"] == "RayJob"]
    assert len(jobs) >= 2  # the one-off certify job and the audit's template
    return jobs


def test_rayjobs_have_a_cpu_head_a_gpu_worker_group_and_cleanup() -> None:
    for name, job in rayjobs():
        assert job["apiVersion"] == "ray.io/v1", name
        spec = job["spec"]
        assert spec["entrypoint"].strip(), name
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert isinstance(spec["ttlSecondsAfterFinished"], int), name
        cluster = spec["rayClusterSpec"]
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", name
        head_container = head["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {}), name
        groups = cluster["workerGroupSpecs"]
        gpu_groups = [g for g in groups
                      if int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                             .get("nvidia.com/gpu", 0)) >= 1]
        assert gpu_groups, f"{name}: no worker group with nvidia.com/gpu limits"
        for group in gpu_groups:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        images = {c["image"] for c in [head_container] + [
            g["template"]["spec"]["containers"][0] for g in groups]}
        assert images == {cluster_config()["docker"]["image"]}, name  # the Dockerfile's image
        ray_pin = re.search(r"^ray==(\S+)", (REPO / "constraints.txt").read_text(), re.M).group(1)
        assert cluster["rayVersion"] == ray_pin, name
        for container in [head_container] + [g["template"]["spec"]["containers"][0] for g in groups]:
            env = {e["name"]: e for e in container.get("env", [])}
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
                assert "secretKeyRef" in env[var]["valueFrom"], (name, var)
            assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_audit_cronjob_schedules_the_audit_and_fails_with_it() -> None:
    docs = {(d["kind"], d["metadata"].get("name")): d
            for d in yaml.safe_load_all((KUBERAY / "raycronjob-audit.yaml").read_text()) if d}
    cron = docs[("CronJob", "scalecert-audit")]
    assert cron["apiVersion"] == "batch/v1"
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job_spec = cron["spec"]["jobTemplate"]["spec"]
    assert job_spec["backoffLimit"] == 0
    pod = job_spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    account = pod["serviceAccountName"]
    assert ("ServiceAccount", account) in docs
    role = docs[("Role", account)]
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    script = pod["containers"][0]["command"][-1]
    assert "kubectl create -f /templates/rayjob-audit.yaml" in script
    assert "FAILED|STOPPED)" in script and "exit 1" in script
    mounted = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    assert mounted <= {name for kind, name in docs if kind == "ConfigMap"}
    template = yaml.safe_load(docs[("ConfigMap", "scalecert-audit-rayjob")]["data"]["rayjob-audit.yaml"])
    assert template["kind"] == "RayJob" and template["metadata"]["generateName"]
    assert "deploy/kuberay/audit.sh" in template["spec"]["entrypoint"]
    env = {e["name"]: e.get("value") for e in
           template["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert float(env["MAX_DROP"]) == 1.0


# --- every `scalecert` invocation is a real command with real options ------------------------

def split_commands(text: str) -> list[list[str]]:
    """Shell words of each simple command in ``text``; `bash -c '...'` is opened up."""
    commands, current = [], []
    for word in shlex.split(text):
        if word in SHELL_OPERATORS:
            commands.append(current)
            current = []
        else:
            current.append(word)
    commands.append(current)
    out = []
    for cmd in filter(None, commands):
        if cmd[:2] == ["bash", "-c"]:
            out += split_commands(cmd[2])
        else:
            out.append(cmd)
    return out


def scalecert_invocations() -> list[tuple[str, str, list[str]]]:
    """(where, command, arguments) for every `scalecert <command> ...` in the deploy files."""
    found = []
    for name, doc in rayjobs():
        for cmd in split_commands(doc["spec"]["entrypoint"]):
            if cmd[0] == "scalecert":
                found.append((name, cmd[1], cmd[2:]))
            elif cmd[0] == "bash" and cmd[1].endswith("/audit.sh"):
                # audit.sh ROOT [certify options]: the options go to `scalecert certify`
                assert (REPO / "deploy/kuberay/audit.sh").is_file()
                found.append((f"{name} (audit.sh)", "certify", cmd[3:]))
    # audit.sh itself: its `scalecert` lines, and the options it adds to `report`
    text = AUDIT_SH.read_text()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("scalecert "):
            words = shlex.split(line)
            found.append(("audit.sh", words[1], words[2:]))
        elif line.startswith("report+=("):
            found.append(("audit.sh", "report", shlex.split(line[len("report+=("):-1])))
    # the README's and the cluster config's documented submissions
    for line in (REPO / "ray_cluster.yaml").read_text().splitlines():
        match = re.search(r"scalecert (certify .*?)(?:\.\.\.|$)", line)
        if match:
            found.append(("ray_cluster.yaml", "certify", shlex.split(match.group(1))[1:]))
    return found


def check_options(where: str, command_name: str, args: list[str]) -> None:
    command = cli.commands[command_name]
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"{where}: scalecert {command_name} does not accept {unknown}"


@pytest.mark.parametrize("command_name", ["certify", "report"])
def test_scalecert_invocations_use_real_commands_and_options(command_name: str) -> None:
    invocations = scalecert_invocations()
    assert {c for _, c, _ in invocations} <= {"certify", "report"}, invocations
    mine = [inv for inv in invocations if inv[1] == command_name]
    assert mine, f"no `scalecert {command_name}` in the deploy files"
    if command_name not in cli.commands:
        pytest.skip(f"`scalecert {command_name}` is not in pipeline.cli.main yet "
                    f"({len(mine)} invocations in the deploy files wait for it)")
    for where, name, args in mine:
        check_options(where, name, args)
    if command_name == "certify":
        # the cluster-side runs join the cluster and write to S3
        for where, _, args in mine:
            if where.startswith("rayjob") or where.endswith("(audit.sh)"):
                assert "--device" in args and "--workers" in args, where
        sh = [args for where, _, args in mine if where == "audit.sh"]
        assert sh and "--address" in sh[0] and "auto" in sh[0] and "--out" in sh[0]


def test_certify_invocations_parse_with_click() -> None:
    """Beyond the option names: click accepts the whole argument lists of the RayJob entrypoints
    (values, types, choices), up to the point where the run would start."""
    for where, name, args in scalecert_invocations():
        if name != "certify" or where == "audit.sh" or where == "ray_cluster.yaml":
            continue
        ctx = cli.commands["certify"].make_context("certify", list(args), resilient_parsing=False)
        assert ctx.params["address"] in {"auto", None}, where
        if not where.endswith("(audit.sh)"):
            assert ctx.params["out"].startswith("s3://") and ctx.params["address"] == "auto"


# --- audit.sh control flow, with a stub `scalecert` ------------------------------------------

def run_audit(tmp_path: Path, root: Path, run: str, report_rc: int) -> subprocess.CompletedProcess:
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    stub = stub_dir / "scalecert"
    stub.write_text(
        "#!/bin/sh\n"
        'echo "$@" >> "$STUB_LOG"\n'
        'if [ "$1" = report ]; then exit "$REPORT_RC"; fi\n'
    )
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "STUB_LOG": str(tmp_path / "calls.log"), "REPORT_RC": str(report_rc), "RUN_NAME": run,
           "MAX_DROP": "1.0", "ARCHIVE": "s3://archive-bucket/prefix"}
    return subprocess.run(["bash", str(AUDIT_SH), str(root), "--data", "d", "--model", "m"],
                          env=env, capture_output=True, text=True, timeout=60)


def test_audit_script_compares_against_the_last_passed_run(tmp_path: Path) -> None:
    root = tmp_path / "audits"
    log = tmp_path / "calls.log"

    first = run_audit(tmp_path, root, "20260101T020000Z", report_rc=0)
    assert first.returncode == 0, first.stderr
    calls = log.read_text().splitlines()
    out1 = f"{root}/runs/20260101T020000Z"
    assert calls[0] == f"certify --quiet --address auto --data d --model m --out {out1}"
    assert calls[1] == f"report {out1} --archive s3://archive-bucket/prefix"  # no baseline yet
    assert (root / "passed" / "20260101T020000Z").read_text() == out1

    log.unlink()
    dropped = run_audit(tmp_path, root, "20260102T020000Z", report_rc=1)  # accuracy dropped
    assert dropped.returncode != 0
    out2 = f"{root}/runs/20260102T020000Z"
    assert log.read_text().splitlines()[1] == \
        f"report {out2} --against {out1} --max-drop 1.0 --archive s3://archive-bucket/prefix"
    assert not (root / "passed" / "20260102T020000Z").exists()  # never the next baseline

    log.unlink()
    third = run_audit(tmp_path, root, "20260103T020000Z", report_rc=0)
    assert third.returncode == 0, third.stderr
    assert f"--against {out1} " in log.read_text().splitlines()[1]
    assert sorted(p.name for p in (root / "passed").iterdir()) == \
        ["20260101T020000Z", "20260103T020000Z"]


def test_shell_scripts_parse() -> None:
    for script in (AUDIT_SH, DEPLOY / "local_cluster_job.sh"):
        assert os.access(script, os.X_OK), script
        subprocess.run(["bash", "-n", str(script)], check=True)


# --- local_cluster_job.sh: ending its own cluster -----------------------------------------------

_SLEEPER = "import time; time.sleep(300)"
_STUBBORN = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             f"print(subprocess.Popen([sys.executable, '-c', {_SLEEPER!r}]).pid, flush=True); "
             "time.sleep(300)")


def test_local_cluster_end_signals_that_clusters_processes_only(tmp_path) -> None:
    """`local_cluster_job.sh --end DIR` on real processes (no Ray needed to pick them): one that
    names a session dir under DIR and ignores SIGTERM (SIGKILLed after RAY_END_GRACE), its child
    that names nothing (as Ray's renamed workers), a polite one; bystanders naming a sibling temp
    dir or /tmp/ray keep running."""
    from support import pid_alive

    temp_dir = tmp_path / "rc"
    temp_dir.mkdir()
    spawn = lambda code, arg, **kw: subprocess.Popen(  # noqa: E731
        [sys.executable, "-c", code, arg], **kw)
    stubborn = spawn(_STUBBORN, f"--session-dir={temp_dir}/session_1", stdout=subprocess.PIPE,
                     text=True)
    child = int(stubborn.stdout.readline())
    polite = spawn(_SLEEPER, f"--log-dir={temp_dir}/session_1/logs")
    bystanders = [spawn(_SLEEPER, f"--session-dir={temp_dir}x/session_1"),
                  spawn(_SLEEPER, "--session-dir=/tmp/ray/session_1")]
    try:
        ended = subprocess.run([str(DEPLOY / "local_cluster_job.sh"), "--end", str(temp_dir)],
                               env={**os.environ, "RAY_END_GRACE": "1"}, capture_output=True,
                               text=True, timeout=60)
        assert ended.returncode == 0, ended.stdout + ended.stderr
        assert f"SIGKILL to {stubborn.pid} " in ended.stderr, ended.stderr
        assert stubborn.wait(timeout=10) == -9 and polite.wait(timeout=10) == -15
        assert not pid_alive(child)
        assert all(p.poll() is None for p in bystanders)
    finally:
        for process in [stubborn, polite, *bystanders]:
            process.kill()
            process.wait()
        if pid_alive(child):
            os.kill(child, 9)


def test_local_cluster_job_refuses_a_temp_dir_other_ray_processes_use(tmp_path) -> None:
    """A temp dir some running Ray already uses (say /tmp/ray) is refused before anything
    starts: ending this cluster would end those processes too."""
    temp_dir = tmp_path / "shared-ray"
    temp_dir.mkdir()
    theirs = subprocess.Popen(
        [sys.executable, "-c", _SLEEPER, f"--session-dir={temp_dir}/session_1"])
    try:
        refused = subprocess.run([str(DEPLOY / "local_cluster_job.sh"), "--data", "x"],
                                 env={**os.environ, "RAY_TEMP_DIR": str(temp_dir)},
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "give this cluster a temp dir of its own" in refused.stderr
        assert theirs.poll() is None
    finally:
        theirs.kill()
        theirs.wait()


_RAY_STOP = re.compile(r"""\bray\s+stop\b|['"]ray['"]\s*,\s*['"]stop['"]""")


def test_no_script_or_test_runs_ray_stop() -> None:
    """`ray stop` ends every Ray process of the machine: scripts and tests end their own
    clusters instead (ray_cluster.yaml, for dedicated VMs, may use it)."""
    bench, tests = REPO / "bench", REPO / "tests"
    files = [*DEPLOY.rglob("*.sh"), *bench.rglob("*.sh"), *bench.rglob("*.py"),
             *tests.rglob("*.py"), REPO / "Makefile", *(REPO / ".ci").iterdir()]
    offending = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                 for path in files if path.is_file()
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if _RAY_STOP.search(line) and not line.lstrip().startswith("#")
                 and not (path.suffix == ".py" and "`ray stop`" in line)]
    assert not offending, offending
