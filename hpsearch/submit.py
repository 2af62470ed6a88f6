"""``hpsearch submit``: hand a search to a running Ray cluster's job server (Ray Jobs).

The job file is validated here first, so a broken one never reaches the cluster. The working
directory (the project: job files, and whatever else the job reads by relative path) is uploaded
by Ray, and the search's driver runs on the head node as ``python -m hpsearch.cli run JOB
--address auto``; hpsearch must be installed on the cluster's nodes (the configs in ``cluster/`` do
that). Needs ``ray[default]`` on this machine (the job client) and the cluster's dashboard.

Token authentication (on by default from Ray 2.61): Ray's own settings are passed through —
``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` (or ``~/.ray/auth_token``)
— and ``--token`` / ``--token-file`` set them for one command.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hpsearch.errors import SearchError
from hpsearch.spec import load_job

logger = logging.getLogger(__name__)

# Never uploaded: environments, outputs and caches (Ray refuses working dirs over 500 MiB).
EXCLUDES = [".git", ".venv", "venv", ".whl", "__pycache__", "*.pyc", ".pytest_cache", ".hypothesis",
            "hpsearch_runs", "ray_results", "mlflow.db", "mlruns", "mlartifacts", "*.egg-info", "gpu-out"]

# Exit codes of `submit --follow`, from the job's end (the driver's own code where Ray knows it).
JOB_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}


@dataclass
class Submission:
    submission_id: str
    address: str
    entrypoint: str


def set_auth(token: str | None, token_file: Path | None) -> None:
    """Ray's token settings for this process (read when Ray's client starts)."""
    if token and token_file:
        raise SearchError("--token and --token-file: give one of them, not both")
    if token_file is not None:
        if not token_file.is_file():
            raise SearchError(f"--token-file {token_file}: no such file")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file.resolve())
        os.environ.pop("RAY_AUTH_TOKEN", None)
    if token:
        os.environ["RAY_AUTH_TOKEN"] = token
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    if token or token_file is not None:
        os.environ["RAY_AUTH_MODE"] = "token"


def entrypoint(job_file: Path, working_dir: Path, overrides: tuple[str, ...]) -> str:
    """The command the cluster runs, with the job file's path relative to the working directory."""
    try:
        relative = job_file.resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise SearchError(
            f"{job_file}: is outside the working directory {working_dir.resolve()}, which is what Ray uploads; "
            "move the job file into it, or pass --working-dir with a folder that holds it"
        ) from None
    parts = ["python", "-m", "hpsearch.cli", "run", relative.as_posix(), "--address", "auto"]
    for item in overrides:
        parts += ["--set", item]
    return shlex.join(parts)


def submit(job_file: Path, *, address: str, overrides: tuple[str, ...] = (), working_dir: Path = Path("."),
           submission_id: str | None = None) -> Submission:
    """Validate the job here, then submit its search to the job server at ``address``."""
    job = load_job(job_file, overrides)  # every problem of the file, before anything is sent
    if not working_dir.is_dir():
        raise SearchError(f"--working-dir {working_dir}: not a folder")
    for folder in job.code if job.factories() else ():
        if folder != os.getcwd() and not Path(folder).is_relative_to(working_dir.resolve()):
            raise SearchError(f"code: {folder} is outside the working directory {working_dir.resolve()}, which is "
                              "what Ray uploads: your factories' code would not reach the cluster; move it in, or "
                              "pass --working-dir with a folder that holds it")
    command = entrypoint(job_file, working_dir, overrides)
    client = _client(address)
    runtime_env = {"working_dir": str(working_dir.resolve()), "excludes": EXCLUDES}
    try:
        sid = client.submit_job(entrypoint=command, runtime_env=runtime_env, submission_id=submission_id)
    except Exception as e:
        raise SearchError(f"--address {address}: the job server refused the search: {_first_line(e)}") from None
    return Submission(sid, address, command)


def follow(submission: Submission, *, echo: Callable[[str], None], poll_s: float = 1.0) -> tuple[str, int]:
    """Stream the job's logs until it ends; returns its status and the exit code to end with."""
    import asyncio

    client = _client(submission.address)
    sid = submission.submission_id

    async def tail() -> None:
        # Ray's own tail: only the new lines, as they come, until the job ends.
        async for lines in client.tail_job_logs(sid):
            echo(lines.rstrip("\n"))

    try:
        asyncio.run(tail())
        status = str(client.get_job_status(sid).value)
        while status not in JOB_EXIT:  # the log can close a moment before the status is final
            time.sleep(poll_s)
            status = str(client.get_job_status(sid).value)
        info = client.get_job_info(sid)
    except Exception as e:
        raise SearchError(f"--address {submission.address}: lost the job server while following {sid}: "
                          f"{_first_line(e)}; the search may still be running (ray job status {sid})") from None
    code = JOB_EXIT[status]
    if status == "FAILED":
        driver_code = getattr(info, "driver_exit_code", None)
        code = driver_code if isinstance(driver_code, int) and driver_code > 0 else 1
    return status, code


def _client(address: str):  # -> JobSubmissionClient
    if not address.startswith(("http://", "https://")):
        raise SearchError(f"--address {address}: give the job server's URL, e.g. http://HEAD:8265 "
                          "(the Ray dashboard's address)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise SearchError("hpsearch submit needs Ray's job client: pip install 'ray[default]'") from None
    # Ray's packaging chatter (one line per .gitignore it honours) is no news to the user.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return JobSubmissionClient(address)
    except Exception as e:
        raise SearchError(f"--address {address}: cannot reach a Ray job server there: {_first_line(e)}. "
                          "Is the cluster up, with its dashboard listening (ray start --head "
                          "--dashboard-host=...)?") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
