"""A full storage disk stops the search, cleanly and resumably, before it fails the trials.

Without this, a full disk fails trial after trial (each checkpoint write raises ENOSPC), and
then the driver's own log write. Instead, the driver watches the free space of a local storage
(:class:`FreeSpace`, at most once a second) and stops the search like Ctrl-C does while there is
still room to record it; a trial or a log write that meets ENOSPC all the same stops it too
(:func:`stop`). The search then ends with :attr:`~hpsearch.record.trial_log.StopReason.STORAGE_FULL`:
everything written so far stays readable, and ``hpsearch resume`` continues once there is space.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("hpsearch.search")

# Stop while this much is free (the trial log, the outputs and a few checkpoints still fit).
MIN_FREE_BYTES = int(float(os.environ.get("HPSEARCH_MIN_FREE_MB", "64")) * 2**20)

_stopped: list[str] = []  # why this driver stopped its search for space (one search per driver)


def is_full(error: Any) -> bool:
    """Whether an error (an exception, or a trial's error text) is a full disk."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return bool(error) and ("No space left on device" in str(error) or "Disk quota exceeded" in str(error))


def stop(why: str) -> None:
    """Stop the search for want of space (once): said, and ``fit()`` interrupted like Ctrl-C."""
    if _stopped:
        return
    _stopped.append(why)
    logger.warning("storage full (%s): stopping the search; what is written stays readable. Free space, then "
                   "`hpsearch resume` continues it", why)
    if threading.current_thread() is threading.main_thread():
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own graceful stop (trials continue on resume)


def stopped() -> str | None:
    """Why this driver stopped its search for space, if it did."""
    return _stopped[0] if _stopped else None


def reset() -> None:
    _stopped.clear()


class FreeSpace:
    """The free space of a local storage folder, looked at no more than once a second."""

    def __init__(self, folder: Path | None, *, min_free: int | None = None) -> None:
        self.folder, self.min_free = folder, min_free
        self._next = 0.0

    def check(self) -> None:
        if self.folder is None or _stopped or time.time() < self._next:
            return
        self._next = time.time() + 1.0
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError:
            return
        need = MIN_FREE_BYTES if self.min_free is None else self.min_free
        if free < need:
            stop(f"{self.folder}: {free / 2**20:.0f} MB free, under the {need / 2**20:.0f} MB a search keeps free "
                 "(HPSEARCH_MIN_FREE_MB)")
