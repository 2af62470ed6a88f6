"""The light commands stay light: no torch, Ray or MLflow imported for --help and validate."""

from __future__ import annotations

import subprocess
import sys

from support import REPO

HEAVY = ("torch", "ray", "mlflow", "optuna", "pyarrow")

PROBE = """
import sys
from hpsearch.cli import main
sys.argv = ["hpsearch", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    code = e.code
print("HEAVY:" + ",".join(m for m in {heavy!r} if m in sys.modules))
sys.exit(code)
"""


def _probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_help_and_validate_import_nothing_heavy() -> None:
    for args in (["--help"], ["validate", "jobs/mnist.yaml"], ["validate", "missing.yaml"]):
        done = _probe(*args)
        assert "HEAVY:\n" in done.stdout, (args, done.stdout, done.stderr)
    assert _probe("validate", "jobs/mnist.yaml").returncode == 0
    assert _probe("validate", "missing.yaml").returncode == 2


def test_console_script_is_installed() -> None:
    done = subprocess.run(["hpsearch", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "hpsearch" in done.stdout
