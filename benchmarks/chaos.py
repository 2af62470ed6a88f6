"""The chaos tests as a soak: tests/test_chaos.py run again and again, each time with another seed
(other kill moments), and a tally. Use it after touching resume, retries or the record.

    python benchmarks/chaos.py [--runs 5] [--first-seed 0] [-k worker|driver]

Prints one line per run (seed, passed or failed, seconds) and the pass rate; a failing seed replays
with ``HPSEARCH_CHAOS_SEED=<seed> python -m pytest tests/test_chaos.py``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("-k", default="", help="pytest -k expression (e.g. worker, driver)")
    args = ap.parse_args()
    passed = 0
    for seed in range(args.first_seed, args.first_seed + args.runs):
        t0 = time.time()
        env = {**os.environ, "HPSEARCH_CHAOS_SEED": str(seed)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_chaos.py")]
        done = subprocess.run(cmd + (["-k", args.k] if args.k else []), cwd=REPO, env=env, capture_output=True, text=True)
        ok = done.returncode == 0
        passed += ok
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-200:]
        print(f"seed {seed}: {'passed' if ok else 'FAILED'} in {time.time() - t0:.0f} s  ({summary})", flush=True)
        if not ok:  # what failed, for the replay
            print("\n".join(line for line in done.stdout.splitlines() if line.startswith(("E ", "FAILED")))[-3000:])
    print(f"{passed}/{args.runs} runs passed ({passed / args.runs:.0%})")
    sys.exit(0 if passed == args.runs else 1)


if __name__ == "__main__":
    main()
