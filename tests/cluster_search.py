"""Run one hpsearch search on a two-node Ray cluster made on this machine (loopback only).

    python tests/cluster_search.py JOB.yaml [--remove-worker]

The head and one worker node each give one CPU, so two trials run at once, one per node.
With --remove-worker, the worker node is removed once a trial on it has reported two epochs:
its trial must finish on the head from its checkpoint. Prints the worker's node id and the
search's counts as JSON lines (``WORKER ...``, ``COUNTS ...``), and the driver's process id
(``DRIVER ...``). Run by tests/test_cluster.py.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every node on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from ray.cluster_utils import Cluster  # noqa: E402

from hpsearch.record.location import SearchLocation  # noqa: E402
from hpsearch.record.trial_log import LOG_FILE  # noqa: E402
from hpsearch.search import run_search  # noqa: E402
from hpsearch.spec import load_job  # noqa: E402


def main() -> None:
    job = load_job(sys.argv[1])  # a job with factories: its code found beside it, as `hpsearch run` finds it
    remove = "--remove-worker" in sys.argv
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    print("WORKER", json.dumps(worker.node_id), flush=True)
    print("DRIVER", os.getpid(), flush=True)
    log = SearchLocation.of(job.storage, job.name).local / LOG_FILE

    def remove_worker_mid_trial() -> None:
        while True:
            time.sleep(0.2)
            lines = log.read_text().splitlines() if log.exists() else []
            events = [json.loads(line) for line in lines if line.strip()]
            if any(e["event"] == "result" and e.get("node_id") == worker.node_id and e.get("epoch", 0) >= 2
                   for e in events):
                cluster.remove_node(worker)
                print("REMOVED", flush=True)
                return

    if remove:
        threading.Thread(target=remove_worker_mid_trial, daemon=True).start()
    try:
        summary = run_search(job, address=cluster.address)
        print("COUNTS", json.dumps(summary.counts), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
