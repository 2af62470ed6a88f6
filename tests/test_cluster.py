"""Clusters: Ray's own validation of cluster/ configs, the `ray submit` entry script, a two-node
search with a node lost midway, the shared-storage refusal, and `hpsearch submit` (Ray Jobs).

Multi-node Ray stays on loopback (see ../shared/RAY-NOTES.md): the two-node searches use
``ray.cluster_utils.Cluster`` with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in a subprocess; the tests
that need ``ray start`` nodes run them in a private network, PID and mount namespace
(``unshare``), so every Ray process ends with the namespace and nothing listens outside it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from support import REPO, write_user_code

LAUNCHER_CONFIGS = ["aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"]
RAY = str(Path(sys.executable).parent / "ray")
HPSEARCH = str(Path(sys.executable).parent / "hpsearch")


def _ray_validates(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_configs_pass_rays_own_validation(name: str) -> None:
    config = yaml.safe_load((REPO / "cluster" / name).read_text())
    _ray_validates(config)
    # Each installs this package from the checkout it copies to the nodes, and runs no trials on a
    # CPU head of a cloud cluster.
    assert config["file_mounts"] == {"~/hpsearch": "."}
    assert any("pip install" in c and "~/hpsearch" in c for c in config["setup_commands"])
    if config["provider"]["type"] != "local":
        workers = config["available_node_types"]["gpu_worker"]
        assert workers["min_workers"] == 0 and workers["max_workers"] >= 1
        assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_a_misspelt_key_fails_rays_validation(name: str) -> None:
    import jsonschema

    config = yaml.safe_load((REPO / "cluster" / name).read_text())
    top = copy.deepcopy(config)
    top["setup_comands"] = top.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        _ray_validates(top)
    if "available_node_types" in config:
        nested = copy.deepcopy(config)
        node = nested["available_node_types"][nested["head_node_type"]]
        node["node_confg"] = node.pop("node_config")
        with pytest.raises(jsonschema.ValidationError, match="node_confg"):
            _ray_validates(nested)


def test_kuberay_rayjob_runs_hpsearch_on_gpu_workers() -> None:
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay-rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1" and job["spec"]["entrypoint"].startswith("hpsearch run jobs/")
    entry = job["spec"]["entrypoint"].split()
    assert (REPO / entry[2]).is_file() and "--address" in entry
    spec = job["spec"]["rayClusterSpec"]
    gpu = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    # Shared storage: the same claim mounted on the head and the workers, and the search writes there.
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        volume = group["template"]["spec"]["volumes"][0]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    mount = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
    assert f"storage={mount}/" in job["spec"]["entrypoint"]


def test_ray_submit_entry_script_runs_hpsearch_in_the_checkout(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "cluster"))
    try:
        import submit
    finally:
        sys.path.pop(0)
    assert submit.command(["run", "jobs/mnist.yaml"])[-4:] == ["run", "jobs/mnist.yaml", "--address", "auto"]
    assert submit.command(["run", "j.yaml", "--address", "ray://h:10001"])[-1] == "ray://h:10001"
    assert "--address" not in submit.command(["validate", "jobs/mnist.yaml"])
    # As `ray submit` runs it on the head: from anywhere, with the checkout at HPSEARCH_HOME.
    env = {**os.environ, "HPSEARCH_HOME": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "cluster" / "submit.py"), "validate", "jobs/digits.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "jobs/digits.yaml: ok" in done.stdout, done.stderr
    env["HPSEARCH_HOME"] = str(tmp_path / "missing")
    done = subprocess.run([sys.executable, str(REPO / "cluster" / "submit.py"), "run", "jobs/digits.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "does not exist" in done.stderr


# --------------------------------------------------------------------------------------------
# Two nodes (ray.cluster_utils.Cluster, in a subprocess)
# --------------------------------------------------------------------------------------------


def _two_node_search(tmp_path: Path, *args: str, job_folder: Path | None = None, cwd: Path | None = None,
                     **sections: Any) -> tuple[str, list[dict], list[dict]]:
    job = {
        "name": "two-nodes", "data": {"dataset": "digits"},
        # Long enough per trial (about 0.4 s an epoch) for a node to be lost while one runs.
        "space": {"num_hidden_layers": 1, "neurons_per_layer": 32, "epochs": 10, "batch_size": 8,
                  "learning_rate": {"type": "categorical", "choices": [0.01, 0.012, 0.014, 0.016]}},
        "search": {"num_samples": 4, "max_failures": 2, "scheduler": {"name": "fifo"},
                   "searcher": {"sampler": "grid"}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "storage": str(tmp_path / "runs"),
        **sections,
    }
    (job_folder or tmp_path).mkdir(exist_ok=True)
    (job_folder or tmp_path).joinpath("job.yaml").write_text(yaml.safe_dump(job))
    done = subprocess.run([sys.executable, str(REPO / "tests" / "cluster_search.py"),
                           str((job_folder or tmp_path) / "job.yaml"), *args],
                          capture_output=True, text=True, timeout=420, cwd=cwd or tmp_path)
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines()
                 if line.startswith(("WORKER ", "COUNTS ", "DRIVER ")))
    _two_node_search.driver_pid = int(lines.get("DRIVER", 0))  # type: ignore[attr-defined]
    assert done.returncode == 0 and "COUNTS" in lines, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "runs" / "two-nodes"
    assert json.loads(lines["COUNTS"]) == {"completed": 4}
    return (json.loads(lines["WORKER"]), pq.read_table(out / "trials.parquet").to_pylist(),
            pq.read_table(out / "epochs.parquet").to_pylist())


@pytest.mark.slow
def test_a_two_node_search_runs_trials_on_both_nodes_with_the_user_s_code(tmp_path: Path) -> None:
    # The model is the user's own: its module lives only beside the job file, which is not the
    # driver's working directory; the trials on both nodes import Ray's shipped copy of it.
    imports = tmp_path / "imports.log"
    code = tmp_path / "project"
    write_user_code(code, "ep_cluster", f"""
import os
with open({str(imports)!r}, "a") as log:
    log.write(f"{{os.getpid()}} {{__file__}}\\n")
""")
    (tmp_path / "elsewhere").mkdir()
    worker, trials, epochs = _two_node_search(
        tmp_path, job_folder=code, cwd=tmp_path / "elsewhere",
        model={"kind": "python", "factory": "ep_cluster:build",
               "hyperparameters": {"width": 32, "depth": 1, "act": "relu"}},
        space={"epochs": 10, "batch_size": 8,
               "learning_rate": {"type": "categorical", "choices": [0.01, 0.012, 0.014, 0.016]}})
    assert len(trials) == 4 and all(t["status"] == "completed" and t["epochs_run"] == 10 for t in trials)
    nodes = {e["node_id"] for e in epochs}
    assert len(nodes) == 2 and worker in nodes
    rows = [line.split(" ", 1) for line in imports.read_text().splitlines()]
    driver = str(_two_node_search.driver_pid)  # type: ignore[attr-defined]
    assert [path for pid, path in rows if pid == driver] == [str(code / "ep_cluster.py")]
    in_trials = {path for pid, path in rows if pid != driver}
    assert in_trials and all("runtime_resources" in path and path.endswith("ep_cluster.py") for path in in_trials)


@pytest.mark.slow
def test_a_lost_node_s_trial_finishes_on_the_other_from_its_checkpoint(tmp_path: Path) -> None:
    worker, trials, epochs = _two_node_search(tmp_path, "--remove-worker")
    assert len(trials) == 4 and all(t["status"] == "completed" and t["epochs_run"] == 10 for t in trials)
    by_trial: dict[str, list[tuple[int, str]]] = {}
    for e in epochs:
        by_trial.setdefault(e["trial_id"], []).append((e["epoch"], e["node_id"]))
    moved = [t for t, rows in by_trial.items() if len({node for _, node in rows}) == 2]
    assert len(moved) == 1, by_trial
    rows = sorted(by_trial[moved[0]])
    assert [epoch for epoch, _ in rows] == list(range(1, 11))  # every epoch once: none lost, none repeated
    first_elsewhere = next(epoch for epoch, node in rows if node != worker)
    assert first_elsewhere > 2  # continued from its checkpoint, not from epoch 1
    assert all(node == worker for epoch, node in rows if epoch < first_elsewhere)
    log = (tmp_path / "runs" / "two-nodes" / "hpsearch_trials.jsonl").read_text().splitlines()
    assert any(json.loads(line)["event"] == "retry" and json.loads(line)["trial_id"] == moved[0] for line in log)


# --------------------------------------------------------------------------------------------
# `ray start` nodes in a private namespace
# --------------------------------------------------------------------------------------------


def _can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    done = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount", "true"], capture_output=True)
    return done.returncode == 0


needs_namespaces = pytest.mark.skipif(not _can_unshare(), reason="needs unshare (root) for private namespaces")


@pytest.fixture
def ray_tmp() -> Path:
    """A short folder for `ray start --temp-dir` (Ray's socket paths must fit in 107 bytes)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="hps-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _in_namespace(tmp_path: Path, script: str, timeout: int = 420) -> subprocess.CompletedProcess:
    """Run a bash script in a fresh network + PID + mount namespace: only `lo`, and every process
    it starts (Ray's included) ends with it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path / "home"), RAY_USAGE_STATS_ENABLED="0", PATH=f"{Path(sys.executable).parent}:"
               + env.get("PATH", ""), PYTHONUNBUFFERED="1")
    (tmp_path / "home").mkdir(exist_ok=True)
    path = tmp_path / "script.sh"
    path.write_text("set -u\nexec 2>&1\nip link set lo up\n" + script)
    return subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", str(path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@needs_namespaces
def test_local_storage_that_a_node_cannot_see_is_refused(tmp_path: Path, ray_tmp: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    job = {"name": "t", "data": {"dataset": "digits"}, "space": {"epochs": 1}, "search": {"num_samples": 1},
           "storage": str(runs),
           "tracking": {"enabled": False}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    done = _in_namespace(tmp_path, f"""
{RAY} start --head --port=6391 --num-cpus=1 --include-dashboard=false --temp-dir={ray_tmp}/h > /dev/null || exit 3
# The worker node sees an empty folder where the head sees the storage: a path that is not shared.
unshare --mount --propagation private bash -c 'mount -t tmpfs none {runs} && \
  {RAY} start --address=127.0.0.1:6391 --num-cpus=1 --temp-dir={ray_tmp}/w \
  --dashboard-agent-listen-port=52366 > /dev/null' || exit 4
{HPSEARCH} run {tmp_path}/job.yaml --address 127.0.0.1:6391
echo "rc=$?"
""")
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "rc=2" in out, out[-4000:]
    assert f"storage: {runs} is not shared: 1 of the cluster's 2 nodes cannot see it" in out
    assert "s3://" in out and "Traceback" not in out
    assert not (runs / "t").exists()  # refused before any trial: nothing left behind


@pytest.mark.slow
@needs_namespaces
def test_hpsearch_submit_runs_a_search_on_a_cluster_with_token_auth(tmp_path: Path, ray_tmp: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123456789abcdef")
    # A search whose trials fail for real (the user's code refuses any width but its default):
    # `--follow` ends with the driver's own exit code, 1 for the failure limit.
    project = tmp_path / "project"
    write_user_code(project, "ep_follow", "_build = build\n"
                    "def build(hp, input_shape, num_classes):\n"
                    "    if hp['width'] != 32:\n        raise RuntimeError('not this width')\n"
                    "    return _build(hp, input_shape, num_classes)\n")
    from support import user_job, write_job

    job = user_job(tmp_path, "ep_follow", search={"num_samples": 4, "max_failures": 0, "max_failed_trials": 1,
                                                  "max_concurrent_trials": 1})
    job["name"] = "limit"
    write_job(project / "job.yaml", job)
    common = (f"--set storage={tmp_path}/runs --set tracking.uri=sqlite:///{tmp_path}/mlflow.db "
              "--set search.num_samples=3")
    done = _in_namespace(tmp_path, f"""
RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token} {RAY} start --head --port=6392 --num-cpus=2 \
  --dashboard-host=127.0.0.1 --dashboard-port=8267 --temp-dir={ray_tmp}/h > /dev/null || exit 3
echo "== no token"
{HPSEARCH} submit jobs/digits.yaml --address http://127.0.0.1:8267 {common}
echo "rc=$?"
echo "== good job"
{HPSEARCH} submit jobs/digits.yaml --address http://127.0.0.1:8267 --follow --token-file {token} {common}
echo "rc=$?"
echo "== failing job"
{HPSEARCH} submit jobs/digits.yaml --address http://127.0.0.1:8267 --follow --token "$(cat {token})" {common} \
  --set name=broken --set data.dataset=mnist --set data.root={tmp_path}/nothing --set data.download=false
echo "rc=$?"
echo "== failure limit (the token in RAY_AUTH_TOKEN)"
RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat {token}) {HPSEARCH} submit {project}/job.yaml --working-dir {project} \
  --address http://127.0.0.1:8267 --follow --set storage={tmp_path}/runs --set tracking.enabled=false
echo "rc=$?"
echo "== stopped (the token in ~/.ray/auth_token)"
mkdir -p $HOME/.ray && cp {token} $HOME/.ray/auth_token
RAY_AUTH_MODE=token {HPSEARCH} submit jobs/digits.yaml --address http://127.0.0.1:8267 --follow {common} \
  --set name=stopped --set search.num_samples=50 --set space.epochs=50 > {tmp_path}/follow.out 2>&1 &
follower=$!
for i in $(seq 1 300); do grep -q "trial" {tmp_path}/follow.out && break; sleep 0.5; done
sid=$(grep -o "raysubmit_[A-Za-z0-9]*" {tmp_path}/follow.out | head -1)
RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token} {RAY} job stop --address http://127.0.0.1:8267 $sid > /dev/null
wait $follower
echo "rc=$?"
cat {tmp_path}/follow.out | tail -3
""", timeout=600)
    out = done.stdout + done.stderr
    codes = [part.split("rc=")[1].split()[0] for part in out.split("== ")[1:]]
    no_token, good, failing, limit, stopped = codes
    assert no_token == "2" and "Authentication" in out.split("== good job")[0], out[-4000:]
    assert good == "0", out[-4000:]
    assert "submitted raysubmit_" in out and "[3/3] trial" in out and ": SUCCEEDED" in out
    assert len(pq.read_table(tmp_path / "runs" / "digits-mlp" / "trials.parquet")) == 3
    assert (tmp_path / "runs" / "digits-mlp" / "best.yaml").is_file()
    assert failing == "2" and "no mnist IDX files" in out and ": FAILED" in out
    # --token, --token-file, and Ray's own RAY_AUTH_TOKEN and ~/.ray/auth_token, each used above
    assert limit == "1" and "trials failed (search.max_failed_trials: 1)" in out, out[-4000:]  # the driver's code
    assert stopped == "130" and ": STOPPED" in out, out[-4000:]


@pytest.mark.slow
@needs_namespaces
def test_run_with_a_ray_client_address_from_outside_the_cluster(tmp_path: Path, ray_tmp: Path) -> None:
    # `hpsearch run --address ray://HEAD:10001`: the driver here, Tune's loop on the head (Ray
    # Client); the storage is a folder both see.
    for attempt, (port, client_port) in enumerate([(6393, 6401), (6395, 6403)]):
        # On a loaded machine the client server's own process can take longer than its default 30 s
        # to answer: "Initialization failure from server" (Ray's, not ours).
        done = _in_namespace(tmp_path, f"""
export RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S=180
{RAY} start --head --port={port} --num-cpus=2 --include-dashboard=false --ray-client-server-port={client_port} \
  --temp-dir={ray_tmp}/h{attempt} > {tmp_path}/ray_start.log 2>&1 || {{ echo "ray start failed"; exit 3; }}
# `ray start` returns before the Ray Client server listens: wait for its port
for i in $(seq 1 120); do (echo > /dev/tcp/127.0.0.1/{client_port}) 2>/dev/null && break; sleep 0.5; done
{HPSEARCH} run jobs/digits.yaml --address ray://127.0.0.1:{client_port} --set storage={tmp_path}/runs \
  --set name=client-{attempt} --set tracking.uri=sqlite:///{tmp_path}/mlflow.db --set search.num_samples=2 \
  --set search.final.seeds=1
echo "rc=$?"
""")
        out = done.stdout + done.stderr
        # Once more, elsewhere, if the cluster itself did not come up, or if Ray's client server
        # failed to start its per-client server (seen on a loaded machine: Ray's, not ours).
        if "ray start failed" not in out and "Initialization failure from server" not in out:
            break
    out += (tmp_path / "ray_start.log").read_text() if (tmp_path / "ray_start.log").exists() else ""
    assert "rc=0" in out, out[-4000:]
    folder = tmp_path / "runs" / f"client-{attempt}"
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    assert len(trials) == 2 and (folder / "best.yaml").is_file()


def test_submit_refuses_bad_input_before_contacting_a_cluster(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hpsearch.cli import cli

    def submit(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli, ["submit", *args])
        assert "Traceback" not in result.output
        return result.exit_code, result.output

    job = REPO / "jobs" / "digits.yaml"
    code, out = submit(str(job), "--address", "127.0.0.1:8265", "--working-dir", str(REPO))
    assert code == 2 and "--address 127.0.0.1:8265: give the job server's URL, e.g. http://HEAD:8265" in out
    code, out = submit(str(job), "--address", "http://127.0.0.1:8265", "--working-dir", str(tmp_path))
    assert code == 2 and "is outside the working directory" in out
    code, out = submit(str(job), "--address", "http://127.0.0.1:8265", "--set", "search.num_samples=0",
                       "--working-dir", str(REPO))
    assert code == 2 and "search.num_samples: must be an integer >= 1" in out  # checked here, not on the cluster
    code, out = submit(str(job), "--address", "http://127.0.0.1:9", "--working-dir", str(REPO))
    assert code == 2 and "--address http://127.0.0.1:9: cannot reach a Ray job server there" in out
