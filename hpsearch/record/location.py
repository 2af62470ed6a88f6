"""Where a search lives: ``<storage>/<name>``, a local folder or a URI (``s3://``, ``gs://``, ...
through pyarrow).

Ray Tune keeps the experiment (its state and every trial's checkpoints) at ``<storage>/<name>``
itself. hpsearch's own files — the job, the trial log, the Parquet tables, ``best.yaml``, the best
model — are written by the driver into a local mirror (``~/.cache/hpsearch/searches/...``) and
uploaded to ``<storage>/<name>/`` beside Tune's: the job when the search starts, the trial log as
trials end (what a resume on another machine needs), and everything at the end. ``hpsearch resume
<storage>/<name>`` downloads them again. A plain path (local, or NFS shared by every node) needs
none of this: everything is written in place.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpsearch.errors import SearchError, StorageError

MIRROR_ROOT = "~/.cache/hpsearch/searches"
TUNER_FILE = "tuner.pkl"  # Ray Tune's: the experiment exists (and can be restored)


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


def list_folders(location: str, prefix: str) -> list[str]:
    """The sub-folders of ``location`` (a local path or a URI) whose names start with ``prefix``,
    sorted by name, as locations of the same kind."""
    import pyarrow.fs as pafs

    fs, base = _fs_for(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except Exception:
        return []
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix))
    return [f"{location.rstrip('/')}/{name}" for name in names]


def list_files(location: str, prefix: str, suffix: str = "") -> list[str]:
    """The names of the files in ``location`` (a local path or a URI) with that prefix and suffix, sorted."""
    import pyarrow.fs as pafs

    fs, base = _fs_for(location)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File
                  and i.base_name.startswith(prefix) and i.base_name.endswith(suffix))


def is_file(location: str) -> bool:
    fs, path = _fs_for(location)
    return fs.get_file_info(path).is_file


def file_size(location: str) -> int | None:
    """The size in bytes of a file at a local path or a URI; None if there is none."""
    fs, path = _fs_for(location)
    info = fs.get_file_info(path)
    return info.size if info.is_file else None


def copy_folder(source: str, destination: str) -> None:
    """Copy a folder to another place of the same filesystem (local, or one URI's)."""
    import pyarrow.fs as pafs

    fs, src = _fs_for(source)
    _, dst = _fs_for(destination)
    fs.create_dir(dst)
    pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)


def trial_dirname(trial: Any) -> str:
    """``trial_<id>``: a trial's folder in the experiment (Tune's default spells out the whole
    config, and gets cut). ``trial``: its id, or Tune's trial object."""
    return f"trial_{trial if isinstance(trial, str) else trial.trial_id}"


@dataclass(frozen=True)
class SearchLocation:
    """Where one search lives: hpsearch's files (``local``) and Tune's experiment (``experiment``).

    With a plain-path storage both are ``<storage>/<name>``. With a URI storage, Tune writes the
    experiment at the URI and hpsearch's files are written in a local mirror, then uploaded beside it.
    """

    local: Path
    experiment: str  # <storage>/<name> as Tune sees it: an absolute path, or a URI
    remote_uri: str | None = None

    @classmethod
    def of(cls, storage: str, name: str) -> SearchLocation:
        """The location of the search ``name`` in ``storage`` (a job's ``storage`` and ``name``)."""
        if is_uri(storage):
            uri = join(storage, name)
            return cls(mirror_dir(uri), uri, uri)
        folder = Path(os.path.expanduser(storage)).resolve() / name
        return cls(folder, str(folder))

    @classmethod
    def parse(cls, location: str | os.PathLike[str]) -> SearchLocation:
        """The location a user gives (``hpsearch resume``): ``<storage>/<name>``, a folder or a URI."""
        text = str(location).rstrip("/")
        if is_uri(text):
            return cls(mirror_dir(text), text, text)
        folder = Path(text).expanduser().resolve()
        return cls(folder, str(folder))

    @property
    def storage(self) -> str:
        """The ``<storage>`` part: the folder the search's folder is in, or the URI above it."""
        return self.experiment.rpartition("/")[0] if self.remote_uri else str(self.local.parent)

    @property
    def name(self) -> str:
        return self.experiment.rpartition("/")[2] if self.remote_uri else self.local.name

    @functools.cached_property
    def remote(self) -> Remote | None:
        return Remote(self.remote_uri) if self.remote_uri else None

    def trial(self, trial_id: str) -> str:
        """A trial's folder in the experiment (its checkpoints): a path or a URI."""
        return join(self.experiment, trial_dirname(trial_id))

    def tune_started(self) -> bool:
        """Whether Ray Tune ever started this search (its experiment can be restored)."""
        if self.remote is not None:
            return self.remote.exists(TUNER_FILE)
        return (self.local / TUNER_FILE).exists()

    def holds_search(self, *marks: str) -> bool:
        """Whether a search is already here: Tune's experiment, or one of hpsearch's ``marks``."""
        local = (self.local / TUNER_FILE).exists() or any((self.local / m).exists() for m in marks)
        return local or (self.remote is not None and self.remote.exists(TUNER_FILE))

    def check_writable(self) -> None:
        """Refuse, with the fix, a storage this process cannot write (before anything starts)."""
        if self.remote is not None:
            self.remote.check_writable()
        folder = self.local.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".hpsearch-write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise StorageError(f"storage: cannot write to {folder}: {e.strerror or e}; "
                               "set storage to a folder you can write") from None

    def upload(self, *names: str) -> None:
        """With a URI storage, copy hpsearch's files of these names from the mirror to the URI."""
        if self.remote is None:
            return
        for name in names:
            if (self.local / name).is_file():
                self.remote.upload(self.local / name, name)

    def download(self, *names: str) -> None:
        """With a URI storage, bring hpsearch's files of these names (where they exist) into the mirror."""
        if self.remote is None:
            return
        for name in names:
            if self.remote.exists(name):
                self.remote.download(name, self.local / name)

    def fetch_newer(self, name: str) -> None:
        """With a URI storage, take the URI's copy of an append-only file where it is the longer one
        (Tune's loop ran elsewhere, e.g. under a Ray Client driver, and uploaded there)."""
        remote = self.remote
        if remote is None or not remote.exists(name):
            return
        local = self.local / name
        data = remote.read_bytes(name)
        if not local.is_file() or len(data) > local.stat().st_size:
            tmp = local.with_name(f".{local.name}.part")
            tmp.write_bytes(data)
            os.replace(tmp, local)

    def require(self, name: str, what: str) -> Path:
        """The local file ``name``, or a SearchError saying this is no search."""
        path = self.local / name
        if not path.is_file():
            raise SearchError(f"{self.experiment}: not a search folder (no {name}); give <storage>/<name> {what}")
        return path
