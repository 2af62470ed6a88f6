#!/usr/bin/env python3
"""Entry script for `ray submit`: runs hpsearch on a cluster's head node.

    ray up cluster/aws-gpu.yaml
    ray submit cluster/aws-gpu.yaml cluster/submit.py run jobs/mnist.yaml --set search.num_samples=128

`ray submit` copies only this one file to the head and runs it there with the arguments after it.
The package and the job files are already on every node: the cluster configs in this folder copy
the checkout to ~/hpsearch (file_mounts) and install it (setup_commands). This script runs
`hpsearch <arguments>` in that checkout, so `jobs/...` paths mean the same as on your machine, and
connects `run` / `resume` to the cluster it is on (`--address auto`) unless told otherwise.
Set HPSEARCH_HOME if the checkout is elsewhere. Standard library only: it runs before anything else.
"""

from __future__ import annotations

import os
import sys

CONNECTS = ("run", "resume")  # the commands that start a search, and so need the cluster's address


def command(argv: list[str]) -> list[str]:
    """The hpsearch command line to run for ``argv`` (what followed the script on `ray submit`)."""
    args = list(argv)
    if any(a in CONNECTS for a in args[:2]) and not any(a == "--address" or a.startswith("--address=") for a in args):
        args += ["--address", "auto"]
    return [sys.executable, "-m", "hpsearch.cli", *args]


def main() -> None:
    checkout = os.path.expanduser(os.environ.get("HPSEARCH_HOME", "~/hpsearch"))
    if not os.path.isdir(checkout):
        sys.exit(f"error: {checkout} does not exist; `ray up` with a config from cluster/ copies the checkout "
                 "there (or set HPSEARCH_HOME to where it is)")
    if len(sys.argv) < 2:
        sys.exit("usage: ray submit CLUSTER.yaml cluster/submit.py run JOB.yaml [--set key=value ...]")
    os.chdir(checkout)
    cmd = command(sys.argv[1:])
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
