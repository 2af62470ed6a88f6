"""Ray's runtime for a search: its environment, start and stop, the threaded set-up around it,
the shared-storage probe, SIGTERM, and how many trials fit at once.

Ray is imported by :func:`import_ray`, never at the top: ``hpsearch --help`` and ``hpsearch
validate`` stay instant, and Ray's settings read at its import are set first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

from hpsearch.errors import SearchError, StorageError

logger = logging.getLogger("hpsearch.search")


def set_ray_environment(address: str | None = None) -> None:
    """The environment Ray reads once, when it is first imported (tests call this too)."""
    if address is None:
        # Keep an embedded Ray on 127.0.0.1 only, so a search on a laptop opens no port to its
        # network (Ray otherwise binds the routable address).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Our callback keeps the record we need; Tune's CSV/JSON/TensorBoard loggers are overhead.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Checkpoint retention forces an experiment snapshot every few epochs; that is expected here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def import_ray(address: str | None) -> None:
    """Set Ray's environment and import it. Idempotent."""
    set_ray_environment(address)
    import ray  # noqa: F401

    # Quiet the libraries' set-up chatter; our own log says what happens.
    # Tune's ResultGrid looks for the result.json files we do not write (our trial log replaces them).
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def import_search_modules() -> None:
    """Tune, Optuna and our modules that use them: imported while Ray starts (seconds of imports)."""
    import optuna

    from hpsearch import space  # noqa: F401
    from hpsearch.tune import callbacks, scheduler, searcher, trial, tuner  # noqa: F401

    optuna.logging.set_verbosity(optuna.logging.WARNING)


# A trial's worker spends its first seconds importing Tune, torch and the training function. Ray
# starts a worker process per CPU as soon as the driver connects ("prestart"); told to, each imports
# these as it starts ("preload"), while the driver still sets up, and Tune's first trial actors then
# take those workers (benchmarks/overhead.py: the first result about 0.9 s sooner for digits). It
# is a race Ray decides: a worker still importing when the first trials start is passed over, and
# Ray starts one more (seen on a Fashion-MNIST search with MLflow on). That costs its imports once;
# Ray stops the idle extra ones.
WORKER_PRELOAD = ["hpsearch.tune.trial", "hpsearch.trainable"]
LOCAL_SYSTEM_CONFIG = {"prestart_worker_first_driver": True, "preload_python_modules": WORKER_PRELOAD}


def trial_actors_take_prestarted_workers() -> None:
    """Ray never gives a prestarted worker to an actor with a runtime environment of its own, and
    Tune gives every trial actor one: an environment variable only PyTorch Lightning reads
    (``PL_DISABLE_FORK``; hpsearch's trials never run Lightning). Without it the trial actors take
    the prestarted workers. Credentials Tune passes on when they are set still make one."""
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # a Ray without this table: its trial actors start workers of their own
        return
    getattr(class_cache, "DEFAULT_ENV_VARS", {}).pop("PL_DISABLE_FORK", None)


def no_usage_tags_without_usage_stats() -> None:
    """Tune tags each search's callbacks for Ray's usage statistics, which hpsearch turns off
    (:func:`set_ray_environment`): to name them, it imports Ray's MLflow integration, and so
    MLflow (about 1 s on 2 cores, in the driver, as the first trials start), even for a search
    with tracking off. With the statistics off there is nothing to tag."""
    try:
        from ray._common.usage import usage_lib
        from ray.air._internal import usage
    except ImportError:  # a Ray without these: it tags as it does
        return
    if not usage_lib.usage_stats_enabled():
        usage.tag_callbacks = lambda callbacks: False


def init_ray(address: str | None, py_modules: list[str] | None = None) -> bool:
    """Start embedded Ray on loopback, or connect to ``address``. Returns True if we started it.

    ``py_modules``: the job's own modules (files, package folders), sent to the cluster's nodes
    for its trials to import.
    """
    import_ray(address)
    import ray

    no_usage_tags_without_usage_stats()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address is None:
            # "local": a Ray of our own, even where `ray start` runs a cluster on this machine
            # (ray.init() would join that one; --address does that when asked).
            ray.init(address="local", include_dashboard=False, _system_config=LOCAL_SYSTEM_CONFIG, **kwargs)
            trial_actors_take_prestarted_workers()
        else:
            if py_modules and not _in_a_ray_job_with_a_working_dir():
                kwargs["runtime_env"] = {"py_modules": list(py_modules)}
            ray.init(address=address, **kwargs)
    except Exception as e:
        # Ray's first line can be a heading ("Initialization failure from server:") over the
        # server's traceback: the heading and the traceback's last line (the error itself).
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        reason = " ".join(dict.fromkeys([lines[0], lines[-1]]))[:500]
        raise SearchError(f"--address {address}: cannot connect to Ray: {reason}"
                          if address else f"cannot start Ray: {e}") from None
    return True


def _in_a_ray_job_with_a_working_dir() -> bool:
    """Whether this driver runs as a Ray job (``hpsearch submit``) whose working directory Ray
    already sends to every node: the job's code travels in it (and a second runtime env for the
    same job would have to be merged with the job's)."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return False
    try:
        return bool(json.loads(raw).get("runtime_env", {}).get("working_dir"))
    except (ValueError, AttributeError):
        return False


def shutdown_ray() -> None:
    import ray

    _stop_autoscaler_monitor()
    ray.shutdown()


def _stop_autoscaler_monitor() -> None:
    """The autoscaler's monitor of a Ray we started (one machine: nothing to scale) ignores
    SIGTERM, and ``ray.shutdown()`` gives it a second before it kills it: a second at the end of
    every search. Killed first, it is gone at once; the other processes stop as before."""
    try:
        from ray._private import ray_constants
        from ray._private.worker import _global_node as node

        monitors = node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node and node.head else []
    except (ImportError, AttributeError):  # another Ray's internals: its own shutdown, as it is
        return
    for info in monitors:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            info.process.kill()
            info.process.wait(timeout=1)


class SetUp:
    """The set-up of a search, its costs overlapped: work handed to :meth:`in_thread` (the data
    set, MLflow's store, imports) runs while Ray starts its processes (:meth:`start_ray`).

    Ray should be imported first and alone (imports hold the GIL), so that its processes start as
    early as they can; the other imports then run while ``ray.init`` mostly waits for them. Any
    failure inside the ``with`` block stops the search before a trial runs, and what was set up is
    undone: each thread's ``undo`` (once it has finished), then Ray, if this set-up started it.
    """

    def __init__(self, address: str | None, *, py_modules: list[str] | None = None) -> None:
        self.address, self.py_modules = address, py_modules
        self.started_ray = False
        self._pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="hpsearch-setup")
        self._futures: list[Future[Any]] = []
        self._undo: list[tuple[Future[Any], Callable[[], None]]] = []

    def in_thread(self, fn: Callable[..., Any], *args: Any, undo: Callable[[], None] | None = None) -> Future[Any]:
        future = self._pool.submit(fn, *args)
        self._futures.append(future)
        if undo is not None:
            self._undo.append((future, undo))
        return future

    def wait(self) -> None:
        """Wait for the work handed to threads; the first error among it is raised here."""
        for future in self._futures:
            future.result()

    def start_ray(self) -> None:
        self.started_ray = init_ray(self.address, self.py_modules)

    def __enter__(self) -> SetUp:
        return self

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        if error is not None:
            for future, undo in self._undo:
                future.cancel()
                # exception() waits for work still running (a parent run being created), so it is
                # never left behind.
                if not future.cancelled() and future.exception() is None:
                    undo()
            if self.started_ray:
                shutdown_ray()
                self.started_ray = False
        self._pool.shutdown(wait=True, cancel_futures=True)


def check_shared_storage(search_dir: Path) -> None:
    """On a cluster of several nodes, every node must see the storage folder (since Ray 2.7 trial
    folders are not synced to the head): refuse before any trial starts, with the fix.

    Checked, not guessed: the driver writes a probe file and a task on every node looks for it.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        logger.info("storage %s: a local path on a one-node cluster; nodes added later must see it at the "
                    "same path (NFS), or use an s3:// / gs:// storage", search_dir.parent)
        return
    probe = search_dir.parent / f".hpsearch-shared-{uuid.uuid4().hex}"
    probe.write_text("")
    try:
        @ray.remote(num_cpus=0)
        def sees(path: str) -> bool:
            return os.path.exists(path)

        refs = {n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")": sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(probe))
            for n in nodes}
        blind = [name for name, ref in refs.items() if not ray.get(ref, timeout=120)]
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise StorageError(
            f"storage: {search_dir.parent} is not shared: {len(blind)} of the cluster's {len(nodes)} nodes "
            f"cannot see it ({', '.join(blind)}). Trials on several nodes need one storage they all reach: "
            "a shared filesystem (NFS) mounted at the same path on every node, or an s3:// / gs:// URI"
        )


def cluster_resources() -> dict[str, float]:
    import ray

    return ray.cluster_resources()


def gpu_per_trial(requested: float | None) -> float:
    """``resources.gpu``; for auto (None), 0.25 where the runtime has GPUs (four small-model trials
    share each GPU), else 0."""
    if requested is not None:
        return requested
    return 0.25 if cluster_resources().get("GPU", 0) > 0 else 0.0


def trial_slots(resources: dict[str, float], *, cpu: float, gpu: float) -> int:
    """How many trials of ``cpu`` CPUs and ``gpu`` GPUs the ``resources`` hold at once (at least 1)."""
    fits = [resources.get("CPU", 0.0) / cpu] if cpu > 0 else []
    if gpu > 0:
        fits.append(resources.get("GPU", 0.0) / gpu)
    # The small tolerance keeps 1 / 0.25 GPUs at 4 despite floating point.
    return max(1, int(min(fits) + 1e-6)) if fits else 1


@contextlib.contextmanager
def sigterm_stops_gracefully() -> Iterator[None]:
    """SIGTERM (a scheduler, ``kill``, a pod's shutdown) stops ``fit()`` like Ctrl-C does.

    Tune handles SIGINT and SIGUSR1 by checkpointing the running trials and returning from
    ``fit()``; it ignores SIGTERM. We pass SIGTERM on as SIGUSR1. Signal handlers can only be set
    from the main thread; elsewhere the defaults stay.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGUSR1))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Outside ``fit()`` (the final retraining), SIGTERM stops like Ctrl-C: KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
