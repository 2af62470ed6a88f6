"""The ``hpsearch`` command. Each command parses, calls one library function, and prints.

Errors a user can fix (:class:`hpsearch.errors.HpsearchError`) print one clear message and exit
with code 2; the traceback only with ``--debug``. Heavy libraries (torch, Ray, MLflow) are imported
inside the commands that need them, so ``--help`` and ``validate`` stay instant.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hpsearch import __version__
from hpsearch.errors import HpsearchError

if TYPE_CHECKING:
    from hpsearch.search import SearchSummary

EXIT_USER_ERROR = 2


class _Group(click.Group):
    """Turns HpsearchError into a message and exit code 2 (the traceback only under --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HpsearchError as e:
            if ctx.meta.get("hpsearch.debug"):
                raise
            click.secho(f"error: {e}", fg="red", err=True)
            ctx.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hpsearch")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Find good hyperparameters for PyTorch models from one YAML job file.

    \b
    hpsearch validate jobs/mnist.yaml     check a job file, start nothing
    hpsearch run jobs/digits.yaml         run a search on the embedded local Ray
    hpsearch best hpsearch_runs/digits-mlp
    hpsearch status hpsearch_runs/digits-mlp   (running or finished)
    hpsearch report hpsearch_runs/digits-mlp   (an HTML page of the search)
    hpsearch submit jobs/mnist.yaml --address http://HEAD:8265 --follow   on a Ray cluster
    """
    ctx.meta["hpsearch.debug"] = debug
    _setup_logging(debug)


def _setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("hpsearch")
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a job key, e.g. --set search.num_samples=8 (repeatable; the value is read as YAML).",
)


@cli.command()
@click.argument("job_file", type=click.Path(path_type=Path))
@_set_option
@click.option("--import", "import_code", is_flag=True,
              help="Also import the job's own code (model.factory, data.factory) and check each is callable.")
def validate(job_file: Path, overrides: tuple[str, ...], import_code: bool) -> None:
    """Check a job file and print the resolved job; start nothing.

    A job's own code (its factories) is found, not run; --import imports it too.

    Example: hpsearch validate jobs/mnist.yaml --set search.num_samples=8
    """
    import yaml

    from hpsearch import entrypoints, plan
    from hpsearch.spec import load_job

    job = load_job(job_file, overrides)
    if import_code:
        for where, reference in job.factories():
            entrypoints.load(where, reference, job.code)
    click.echo(f"{job_file}: ok")
    click.echo(yaml.safe_dump(job.to_dict(), sort_keys=False).rstrip())
    click.echo("\nplan:")
    for line in plan.describe(plan.make_plan(job), job):
        click.echo(f"  {line}")


@cli.command()
@click.argument("job_file", type=click.Path(path_type=Path))
@_set_option
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster to run on (auto, ray://HOST:10001, HOST:6379). Default: embedded local Ray.")
def run(job_file: Path, overrides: tuple[str, ...], address: str | None) -> None:
    """Run the search a job file describes.

    Example: hpsearch run jobs/digits.yaml --set search.num_samples=8
    """
    from hpsearch.spec import load_job

    from hpsearch.search import run_search

    job = load_job(job_file, overrides)
    _print_summary(run_search(job, address=address))


@cli.command()
@click.argument("search_dir")
@click.option("--address", default=None, metavar="ADDR", help="Ray cluster to run on. Default: embedded local Ray.")
def resume(search_dir: str, address: str | None) -> None:
    """Continue a search that was stopped or killed: finished trials are kept.

    SEARCH_DIR is <storage>/<name>: a folder, or a URI (s3://bucket/path/name) for a URI storage.

    Example: hpsearch resume hpsearch_runs/mnist-mlp
    """
    from hpsearch.search import resume_search

    _print_summary(resume_search(search_dir, address=address))


@cli.command()
@click.argument("job_file", type=click.Path(path_type=Path))
@_set_option
@click.option("--address", required=True, metavar="URL",
              help="The cluster's job server (its Ray dashboard), e.g. http://HEAD:8265.")
@click.option("--follow", is_flag=True, help="Stream the search's output and exit with its status.")
@click.option("--working-dir", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="The folder Ray uploads for the job; it must hold JOB_FILE.")
@click.option("--submission-id", default=None, help="Name the submission (default: Ray picks one).")
@click.option("--token", default=None,
              help="Ray auth token for clusters with token authentication (or set RAY_AUTH_TOKEN).")
@click.option("--token-file", type=click.Path(path_type=Path), default=None,
              help="File holding the Ray auth token (or set RAY_AUTH_TOKEN_PATH).")
def submit(job_file: Path, overrides: tuple[str, ...], address: str, follow: bool, working_dir: Path,
           submission_id: str | None, token: str | None, token_file: Path | None) -> None:
    """Submit a search to a running Ray cluster (Ray Jobs); the driver runs on its head.

    The job file is checked here first; the working directory, with the job file in it, is
    uploaded. Exit code with --follow: 0 when the search succeeded, else the search's own code
    (1 failure limit, 2 bad input on the cluster, 130 stopped).

    Example: hpsearch submit jobs/mnist.yaml --address http://HEAD:8265 --follow
    """
    from hpsearch import submit as submit_mod

    submit_mod.set_auth(token, token_file)
    sub = submit_mod.submit(job_file, address=address, overrides=overrides, working_dir=working_dir,
                            submission_id=submission_id)
    click.echo(f"submitted {sub.submission_id} to {address}: {sub.entrypoint}")
    if not follow:
        click.echo(f"follow it with: ray job logs --follow {sub.submission_id} --address {address}")
        click.echo(f"stop it with:   ray job stop {sub.submission_id} --address {address}")
        return
    status, code = submit_mod.follow(sub, echo=click.echo)
    click.echo(f"job {sub.submission_id}: {status}")
    if code:
        raise SystemExit(code)


@cli.command()
@click.argument("search_dir")
def best(search_dir: str) -> None:
    """Print the best trial of a finished search (a folder, or a URI for a URI storage).

    Example: hpsearch best hpsearch_runs/mnist-mlp
    """
    from hpsearch.record.outputs import read_best

    b = read_best(search_dir)
    click.echo(f"best trial {b['trial_id']} (epoch {b['epoch']}, {b['metric']} {b['validation'][b['metric']]:.4f}, "
               f"test_accuracy {_fmt(b.get('test_accuracy'))})")
    if b.get("retrained"):
        click.echo(f"retrained on train + validation: test_accuracy {_retrained(b['retrained'])}")
    for name, value in b["hyperparameters"].items():
        click.echo(f"  {name:<18} {value}")
    if b.get("checkpoint"):
        click.echo(f"checkpoint: {b['checkpoint']}")


@cli.command()
@click.argument("search_dir")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Where to write the page (default: report.html in the search folder).")
def report(search_dir: str, output: Path | None) -> None:
    """Write a search's HTML report: history, learning curves, importances, every trial.

    One self-contained page (it opens offline); a running search gets one too. SEARCH_DIR is
    <storage>/<name>, a folder or a URI.

    Example: hpsearch report hpsearch_runs/mnist-mlp -o mnist.html
    """
    from hpsearch.report import write_report

    click.echo(f"report: {write_report(search_dir, output)}")


@cli.command()
@click.argument("search_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON (schema: README, Status).")
def status(search_dir: str, as_json: bool) -> None:
    """Where a running or finished search stands; reads its files only, never starts Ray.

    Example: hpsearch status hpsearch_runs/mnist-mlp --json
    """
    import json

    from hpsearch.status import describe, read_status

    s = read_status(search_dir)
    if as_json:
        click.echo(json.dumps(s.to_dict(), indent=2))
    else:
        for line in describe(s):
            click.echo(line)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _print_summary(s: SearchSummary) -> None:
    counts = ", ".join(f"{n} {status}" for status, n in sorted(s.counts.items()))
    click.echo("")
    click.echo(f"search finished in {s.wall_s:.0f} s: {counts or 'no trials ran'}")
    if s.top:
        metric = s.best["metric"] if s.best else "val_accuracy"
        click.echo(f"\nbest trials by {metric}:")
        hp_cols = tuple(s.columns) or ("num_hidden_layers", "neurons_per_layer", "learning_rate", "dropout_rate",
                                       "batch_size", "optimizer", "weight_decay", "epochs")
        header = f"  {'trial':<14}{'status':<15}{metric:>13}  " + "  ".join(f"{c[:12]:>12}" for c in hp_cols)
        click.echo(header)
        for row in s.top:
            cells = "  ".join(f"{_short(row[c]):>12}" for c in hp_cols)
            click.echo(f"  {row['trial_id']:<14}{row['status']:<15}{row[f'best_{metric}']:>13.4f}  {cells}")
    if s.best:
        click.echo(f"\nbest: trial {s.best['trial_id']}, test_accuracy {_fmt(s.best.get('test_accuracy'))} "
                   f"(its checkpoint, trained on the training split)")
        final = s.best.get("retrained")
        if final:
            click.echo(f"      retrained on train + validation: test_accuracy {_retrained(final)}")
    click.echo(f"\noutputs:  {s.location or s.search_dir}  (trials.parquet, epochs.parquet, best.yaml, job.yaml, "
               "report.html)")
    if s.tracking_uri:
        click.echo(f"MLflow:   {s.tracking_uri}  (parent run {s.parent_run_id}); "
                   f"view with: mlflow ui --backend-store-uri {s.tracking_uri}")
    if s.note:
        click.secho(f"\nnote: {s.note}", fg="yellow")
    if s.stopped:
        click.secho(f"\nsearch stopped early: {s.stopped}", fg="yellow", err=True)
    if s.exit_code:
        raise SystemExit(s.exit_code)


def _retrained(final: dict[str, Any]) -> str:
    """``0.9012 ± 0.0011 (3 seeds: 0.9001, 0.9013, 0.9022; 30 epochs)``."""
    values = ", ".join(_fmt(v) for v in final.get("test_accuracy") or [])
    n = len(final.get("test_accuracy") or [])
    return (f"{_fmt(final.get('mean'))} ± {_fmt(final.get('std'))} ({n} seed{'' if n == 1 else 's'}: {values}; "
            f"{final.get('epochs')} epochs)")


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def main() -> None:
    try:
        cli(prog_name="hpsearch")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    else:
        code = 0
    _exit_now(code)


def _exit_now(code: int) -> None:
    """Exit without tearing down torch, Ray and MLflow module by module (about 2 s on a small
    machine, after the search is over). Only once Ray is shut down and everything is written:
    the search's outputs and MLflow's runs are complete by then, so nothing is lost."""
    import os

    ray = sys.modules.get("ray")
    if ray is None or ray.is_initialized():
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
