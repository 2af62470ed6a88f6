"""Where a search lives when ``storage`` is a URI (``s3://``, ``gs://``, ... through pyarrow).

Ray Tune keeps the experiment (its state and every trial's checkpoints) at ``<storage>/<name>``
itself. hpsearch's own files — the job, the trial log, the Parquet tables, ``best.yaml``, the best
model — are written by the driver into a local mirror (``~/.cache/hpsearch/searches/...``) and
uploaded to ``<storage>/<name>/`` beside Tune's: the job when the search starts, the trial log as
trials end (what a resume on another machine needs), and everything at the end. ``hpsearch resume
<storage>/<name>`` downloads them again. A plain path (local, or NFS shared by every node) needs
none of this: everything is written in place.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from hpsearch.errors import StorageError

MIRROR_ROOT = "~/.cache/hpsearch/searches"
CHECKPOINT_COMPLETE = "metrics.json"  # what a trial writes last into each checkpoint (hpsearch.trial)


def is_uri(storage: str) -> bool:
    return "://" in storage


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def mirror_dir(uri: str) -> Path:
    """The local folder that mirrors hpsearch's files of the search at ``uri`` (``<storage>/<name>``)."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    root = Path(os.path.expanduser(os.environ.get("HPSEARCH_MIRROR", MIRROR_ROOT)))
    return root / f"{name}-{digest}"


class Remote:
    """A folder at a URI, through pyarrow's filesystems (S3, GCS, HDFS, file://, ...)."""

    def __init__(self, uri: str) -> None:
        import pyarrow.fs as pafs

        self.uri = uri.rstrip("/")
        try:
            self.fs, self.path = pafs.FileSystem.from_uri(self.uri)
        except Exception as e:
            raise StorageError(f"storage: {uri} cannot be opened ({_first_line(e)}); use a URI pyarrow knows "
                               "(s3://bucket/path, gs://bucket/path) with its credentials set up") from None

    def _p(self, rel: str) -> str:
        return f"{self.path}/{rel}" if rel else self.path

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self._p(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._p(rel)) as f:
            return f.read()

    def upload(self, local: Path, rel: str) -> None:
        """Copy one local file to ``rel`` (written whole: readers never see half a file)."""
        try:
            self.fs.create_dir(self._p(rel).rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(self._p(rel)) as f:
                f.write(local.read_bytes())
        except Exception as e:
            raise StorageError(f"storage: cannot write {self.uri}/{rel}: {_first_line(e)}") from None

    def download(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part")
        tmp.write_bytes(self.read_bytes(rel))
        os.replace(tmp, local)

    def check_writable(self) -> None:
        probe = f".hpsearch-write-test-{os.getpid()}"
        try:
            self.fs.create_dir(self.path, recursive=True)
            with self.fs.open_output_stream(self._p(probe)) as f:
                f.write(b"")
            self.fs.delete_file(self._p(probe))
        except Exception as e:
            raise StorageError(f"storage: cannot write to {self.uri}: {_first_line(e)}; check the URI and its "
                               "credentials") from None


def checkpoint_folders(trial_location: str) -> list[str]:
    """The ``checkpoint_*`` folders in a trial's folder (a local path or a URI), as locations of the same kind."""
    import pyarrow.fs as pafs

    fs, base = _fs_for(trial_location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except Exception:
        return []
    names = sorted(i.base_name for i in infos
                   if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    return [f"{trial_location.rstrip('/')}/{name}" for name in names]


def restore_missing_checkpoints(experiment: str) -> list[str]:
    """Put back the checkpoints Tune's last experiment snapshot names but the trials have deleted.

    Tune snapshots the experiment every ~10 s, while each trial keeps only its best two and its
    latest checkpoint. After a hard kill (SIGKILL, a lost machine) the last snapshot can name a
    checkpoint deleted since; Tune's restore then fails that trial, and its retry too. Each such
    checkpoint is copied back from the trial's newest one: the trial continues from its newest
    state (it reads its epoch from the checkpoint), as it would have. Returns what was put back.

    The snapshot is Tune's JSON with pickled parts in hex; only the paths in it are read.
    """
    import re

    import pyarrow.fs as pafs

    fs, base = _fs_for(experiment)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    snapshots = sorted(i.base_name for i in infos
                       if i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json"))
    if not snapshots:
        return []
    raw = read_file(f"{experiment.rstrip('/')}/{snapshots[-1]}")
    text = raw
    for blob in re.findall(rb"[0-9a-f]{64,}", raw):
        try:
            text += bytes.fromhex(blob[:len(blob) // 2 * 2].decode())
        except ValueError:
            pass
    restored = []
    for trial, name in sorted(set(re.findall(rb"(trial_[0-9a-f]+)/(checkpoint_\d{6})", text))):
        trial_location = f"{experiment.rstrip('/')}/{trial.decode()}"
        target = f"{trial_location}/{name.decode()}"
        existing = checkpoint_folders(trial_location)
        if target in existing:
            continue
        # The newest whole one: a kill can cut a checkpoint's copy short (its metrics go in last).
        whole = [c for c in existing if fs.get_file_info(_fs_for(f"{c}/{CHECKPOINT_COMPLETE}")[1]).is_file]
        if not whole:
            continue
        _, source = _fs_for(whole[-1])
        _, destination = _fs_for(target)
        fs.create_dir(destination)
        pafs.copy_files(source, destination, source_filesystem=fs, destination_filesystem=fs)
        restored.append(target)
    return restored


def read_file(location: str) -> bytes:
    """The bytes of a file at a local path or a URI."""
    fs, path = _fs_for(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def _fs_for(location: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).absolute())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
