"""What a search exposes: the ports it opens, the secrets it is given, the clusters it starts.

(Credentials in a tracking URI are checked against a real MLflow server in
test_search.py::test_tracking_to_an_mlflow_server.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support import REPO, small_job, write_job
from test_chaos import command_line, descendants

LOOPBACK = {"0100007F",  # 127.0.0.1 in /proc/net/tcp
            "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1
            "00000000000000000000000001000000"}  # ::1


def listening_sockets(pids: list[int]) -> list[tuple[int, str, str]]:
    """(pid, command, local address in /proc/net's hex) of every listening TCP socket of ``pids``."""
    listening = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                listening[fields[9]] = fields[1]
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in listening:
                found.append((pid, command_line(pid), listening[link[8:-1]]))
    return found


@pytest.mark.slow
def test_an_embedded_search_listens_on_loopback_only(tmp_path: Path) -> None:
    # hpsearch's own setting is what is tested: the command runs without the one the tests set.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    job = small_job(tmp_path, search={"num_samples": 4, "scheduler": {"name": "fifo"}})
    job["space"].update(epochs=40, batch_size=8)
    proc = subprocess.Popen([sys.executable, "-m", "hpsearch.cli", "run", str(write_job(tmp_path / "job.yaml", job))],
                            cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        log = tmp_path / "runs" / "t" / "hpsearch_trials.jsonl"
        while not (log.exists() and '"event": "result"' in log.read_text()):  # Ray and its trials all up
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.2)
        sockets = listening_sockets([proc.pid, *descendants(proc.pid)])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    # The program's own name, not the whole line: a long install path may not fit a shortened one.
    programs = {Path(command.split(" ", 1)[0]).name for _, command, _ in sockets}
    assert {"gcs_server", "raylet"} <= programs, sockets
    open_to_others = [(command, address) for _, command, address in sockets
                      if address.rpartition(":")[0] not in LOOPBACK]
    assert open_to_others == [], open_to_others


def test_a_token_given_on_the_command_line_is_never_printed(tmp_path: Path) -> None:
    from support import cli_run

    token = "tok-0123456789abcdef-never-shown"
    with socket.socket() as held:  # bound, never listening: nothing answers there
        held.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{held.getsockname()[1]}"
        result = cli_run("submit", REPO / "jobs" / "digits.yaml", "--address", address, "--token", token,
                         "--working-dir", REPO)
    assert result.exit_code == 2 and "cannot reach a Ray job server there" in result.output
    assert token not in result.output


def _walk(node: object):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_cloud_cluster_configs_open_no_port_to_the_internet_beyond_ssh(name: str) -> None:
    # Ray's launcher makes the cluster's own security group / firewall: SSH from outside, anything
    # between the cluster's nodes. Ours may add nothing wider; the dashboard (on 0.0.0.0 on the
    # head, for the workers) is reached through `ray dashboard`'s SSH tunnel.
    config = yaml.safe_load((REPO / "cluster" / name).read_text())
    for key, value in _walk(config):
        if key in ("IpPermissions", "SecurityGroupIds", "SecurityGroups", "firewall", "firewalls",
                   "networkInterfaces", "NetworkInterfaces", "accessConfigs"):
            rules = [r for r in (value if isinstance(value, list) else [value]) if isinstance(r, dict)]
            wide = [r for r in rules if "0.0.0.0/0" in str(r) and r.get("FromPort", 22) != 22]
            assert not wide, (name, key, value)
    security = config["provider"].get("security_group", {})
    for rule in security.get("IpPermissions", []):
        assert rule.get("FromPort") == rule.get("ToPort") == 22 or "0.0.0.0/0" not in str(rule), rule


def test_the_kuberay_job_exposes_no_service_outside_the_kubernetes_cluster() -> None:
    docs = [d for d in yaml.safe_load_all((REPO / "cluster" / "kuberay-rayjob.yaml").read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"Ingress", "Service", "Route"}, kinds
    for doc in docs:
        for key, value in _walk(doc):
            if key in ("serviceType", "type") and isinstance(value, str):
                assert value not in ("NodePort", "LoadBalancer"), (key, value)
            if key in ("hostNetwork", "hostPort"):
                pytest.fail(f"{key}: {value}")
