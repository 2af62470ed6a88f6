"""Shared fixtures: one real Ray runtime for the whole session, the command run in-process.

Ray's environment is the product's own (:func:`hpsearch.tune.runtime.set_ray_environment`: on
loopback, no usage stats), set before anything imports ray. Ray is started once: ``ray.init``
costs seconds, and a search reuses a runtime it finds. The helpers (small jobs, small data sets
in the real formats) are in support.py.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest
from click.testing import Result

from hpsearch.tune.runtime import set_ray_environment

set_ray_environment()
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def ray_runtime() -> Any:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()




@pytest.fixture
def run_cli() -> Callable[..., Result]:
    """``run_cli("run", path, "--set", "a=b")``: ``hpsearch`` in this process; exit code and output."""
    from support import cli_run

    return cli_run
