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
