"""Helpers the tests share: small jobs written into tmp_path, small data sets in the real formats,
and the ``hpsearch`` command run in-process. (The fixtures are in conftest.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner, Result

REPO = Path(__file__).resolve().parent.parent


def cli_run(*args: Any) -> Result:
    """``hpsearch ARGS...`` in this process (click's runner): its exit code and output."""
    from hpsearch.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def run_job(tmp_path: Path, job: dict[str, Any], *args: str) -> tuple[Result, Path]:
    """Write ``job`` to tmp_path/job.yaml and ``hpsearch run`` it; the result and the search folder."""
    result = cli_run("run", write_job(tmp_path / "job.yaml", job), *args)
    return result, tmp_path / "runs" / job["name"]


def small_job(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A digits job that runs in seconds, writing only under tmp_path."""
    job: dict[str, Any] = {
        "name": "t",
        "seed": 0,
        "data": {"dataset": "digits"},
        "model": {"kind": "mlp", "batch_norm": True},
        "space": {
            "num_hidden_layers": {"type": "int", "low": 1, "high": 2},
            "neurons_per_layer": {"type": "int", "low": 16, "high": 64, "step": 16},
            "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
            "epochs": 3,
            "batch_size": 64,
        },
        "search": {"num_samples": 3, "scheduler": {"name": "fifo"}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "storage": str(tmp_path / "runs"),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    return job


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def write_idx(folder: Path, *, n_train: int = 300, n_test: int = 100, seed: int = 0) -> None:
    """Small MNIST-format IDX files (.gz): 28x28 images whose brightness pattern encodes the label."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, lab in enumerate(labels):  # a learnable signal: a bright row band per class
            images[i, 2 + 2 * lab: 4 + 2 * lab, :] = 250
        header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
        header = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big")
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))


def write_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "frog"), *, per_class: int = 12,
                       size: tuple[int, int] = (20, 14), seed: int = 0) -> None:
    """An ImageFolder tree of PNG files: <root>/<class>/<n>.png, each class its own colour (learnable)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size[1], size[0], 3)).astype(np.uint8)
            pixels[..., label % 3] += 180
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def write_cifar10(root: Path, *, per_batch: int = 40, seed: int = 0) -> None:
    """torchvision's cifar-10-batches-py folder with small batches (the real format, fewer images)."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch)
        images = rng.integers(0, 60, (per_batch, 3, 32, 32)).astype(np.uint8)
        for i, lab in enumerate(labels):  # a learnable signal: a bright band per class
            images[i, :, 3 * lab: 3 * lab + 3, :] = 250
        batch = {"batch_label": name, "labels": labels.tolist(), "data": images.reshape(per_batch, -1),
                 "filenames": [f"{i}.png" for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


# The user's own code, as a person would write it: a data factory (digits as float arrays) and a
# model factory with hyperparameters of its own. Tests write it under a name of their own (modules
# stay imported in a process, and in Ray's reused workers).
USER_CODE = '''
import numpy as np
from torch import nn


def load(scale=1.0):
    from sklearn.datasets import load_digits

    d = load_digits()
    return {"train": (d.data.astype(np.float32) * scale, d.target), "num_classes": 10}


class Net(nn.Module):
    def __init__(self, features, width, depth, num_classes, act):
        super().__init__()
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(features, width), nn.Tanh() if act == "tanh" else nn.ReLU()]
            features = width
        self.body = nn.Sequential(*layers, nn.Linear(features, num_classes))

    def forward(self, x):
        return self.body(x.flatten(1))


def build(hp, input_shape, num_classes):
    return Net(int(np.prod(input_shape)), hp["width"], hp["depth"], num_classes, hp["act"])
'''


def write_user_code(folder: Path, module: str, extra: str = "") -> Path:
    """``folder/module.py``: :data:`USER_CODE` and ``extra`` after it (which may redefine its functions)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}.py"
    path.write_text(USER_CODE + "\n" + extra)
    return path


def user_job(tmp_path: Path, module: str, **sections: Any) -> dict[str, Any]:
    """A job whose data and model both come from ``module`` (see :func:`write_user_code`)."""
    job = small_job(tmp_path, data={"dataset": "python", "factory": f"{module}:load"},
                    model={"kind": "python", "factory": f"{module}:build",
                           "hyperparameters": {"width": 32, "depth": 1, "act": "relu"}})
    job["model"].pop("batch_norm")
    job["space"] = {"width": {"type": "int", "low": 8, "high": 64, "log": True},
                    "depth": {"type": "categorical", "choices": [1, 2]},
                    "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                    "epochs": 3, "batch_size": 64}
    for key, value in sections.items():
        job[key] = {**job[key], **value} if isinstance(value, dict) and isinstance(job.get(key), dict) else value
    return job


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store in ``folder``: started (again on the same
    port, with the same store, after :meth:`kill`), killed, and stopped with the workers it started."""

    def __init__(self, folder: Path) -> None:
        import sys

        self.folder, self.port, self.proc = folder, 0, None
        self.binary = str(Path(sys.executable).parent / "mlflow")

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> MlflowServer:
        import socket
        import subprocess
        import time
        import urllib.request

        def free_port() -> int:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return s.getsockname()[1]

        keep_port = bool(self.port)
        self.port = self.port or free_port()
        log = open(self.folder / "server.log", "a")  # noqa: SIM115 (the server's, closed with it)
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
        deadline, tries = time.time() + timeout, 1  # a fresh store's migrations take a while on a busy machine
        self.proc = self._spawn(log)
        while True:
            try:
                no_proxy.open(f"{self.uri}/health", timeout=2)
                return self
            except OSError:
                if self.proc.poll() is not None and tries < 3 and not keep_port:
                    # The port was free when picked, but something took it before the server bound
                    # it (a port cannot be held across processes): another one.
                    tries, self.port = tries + 1, free_port()
                    self.proc = self._spawn(log)
                    continue
                assert time.time() < deadline and self.proc.poll() is None, (
                    "mlflow server did not start:\n" + (self.folder / "server.log").read_text()[-3000:])
                time.sleep(0.5)

    def _spawn(self, log: Any) -> Any:
        import subprocess

        return subprocess.Popen(
            [self.binary, "server", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--default-artifact-root", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, sig: int = 9) -> None:
        import os

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # the server and the workers it started, nothing else
            self.proc.wait(timeout=30)


class Link:
    """A loopback TCP relay to a server (``port``), to cut it like a lost network: :meth:`cut`
    stops listening and drops every connection (a client then gets "connection refused"), and
    :meth:`restore` listens again on the same port, at once. The server behind keeps running."""

    def __init__(self, port: int) -> None:
        import threading

        self.target, self.port, self.listener = port, 0, None
        self._lock, self._open = threading.Lock(), []

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> Link:
        import socket
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port, self.listener = listener.getsockname()[1], listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    start = restore

    def cut(self) -> None:
        import socket

        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # stops listening (close alone would not, while accept waits)
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._open.clear()

    def _accept(self, listener: Any) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            server = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: Any, sink: Any) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.close()
                except OSError:
                    pass


def assert_nothing_left(tmp_path: Path, name: str = "t") -> None:
    """A search refused before any trial left no folder in tmp_path/runs and no MLflow run."""
    assert not (tmp_path / "runs" / name).exists()
    db = tmp_path / "mlflow.db"
    if db.exists():  # the store may exist; no run may be in it
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{db}")
        exp = client.get_experiment_by_name(name)
        assert exp is None or not client.search_runs([exp.experiment_id])


def snapshot_trials(search_dir: Path) -> set[str]:
    """The trials Tune's newest experiment snapshot in a search folder names, unfinished or not.

    After a hard kill a resume runs on the unfinished ones, each from its newest checkpoint; a
    trial started after that snapshot is lost with the driver and replaced by a new one (Tune
    snapshots every ~10 s). A test that kills a search to see a trial continue waits for this.
    """
    import json

    snapshots = sorted(search_dir.glob("experiment_state-*.json"))
    try:
        data = json.loads(snapshots[-1].read_text())["trial_data"]
    except (IndexError, OSError, ValueError, KeyError):  # none yet, or being written
        return set()
    return {json.loads(trial)["trial_id"] for trial, _ in data}
