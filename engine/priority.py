"""CPU priority of the threads that run the model, below the event loop that shares their cores.

Why: on a small CPU host the model's passes keep every core busy (our native attention kernels run on XLA's own
intra-op pool as well as the calling thread). An event loop in the same process — the bot's, acknowledging
interactions, or ``engine serve``'s, answering HTTP — then waits for a core behind them: on a 2-core Xeon 100
``/dalle`` acknowledgements took 355-423 ms (p99) instead of 48 ms (``bench/RESULTS.md``, "Bot"). A higher
nice value for the model's threads lets the scheduler run the loop first whenever it has work, and the model
keeps every cycle the loop does not use.

Linux only (a thread's nice value is its own there); elsewhere nothing changes. A thread's nice value can be
raised without privileges but not lowered back, so this only ever raises it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NICE = 5
XLA_POOL_THREAD = "tf_XLAEigen"  # the name XLA:CPU gives its intra-op pool threads


def _thread_name(tid: int) -> str:
    try:
        return Path(f"/proc/self/task/{tid}/comm").read_text().strip()
    except OSError:
        return ""


def model_threads() -> list[int]:
    """Native ids of the calling thread and of XLA:CPU's intra-op pool threads (Linux; else the caller only)."""
    tids = [threading.get_native_id()]
    if sys.platform.startswith("linux"):
        try:
            tasks = [int(t) for t in os.listdir("/proc/self/task")]
        except OSError:
            tasks = []
        tids += [t for t in tasks if t not in tids and _thread_name(t) == XLA_POOL_THREAD]
    return tids


def lower_model_threads(nice: int) -> int:
    """Raise the nice value of the calling thread and XLA's pool threads to ``nice`` where it is lower; call it
    from the thread that runs the model. Returns how many threads changed (0 where ``nice`` <= 0 or off Linux)."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return 0
    changed = 0
    for tid in model_threads():
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed += 1
        except OSError as e:  # the thread ended meanwhile, or a sandbox forbids it: the model runs as it was
            log.debug("could not lower the priority of thread %d: %s", tid, e)
    return changed
