"""Forked CPU worker processes that compute result rows for the runner, in order, and die with their parent.

Why processes and not threads: on CPU, one single-threaded process per core certifying its own images scales
almost linearly, while intra-op threads split each small convolution and scaled 1.36x from one to two cores on
the development box (``benchmarks/certify_throughput.py --workers``). Workers inherit the loaded model through
``fork`` instead of pickling it, compute rows and write no file: the parent writes every row, so a killed
worker loses nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from smoothtransfer.errors import UserError

#: ``rows(idxs) -> [(tsv line, correct), ...]``: what a worker computes for one group of images
RowsFn = Callable[[list[int]], list[tuple[str, int]]]

# A forked worker finds the rows function here (set by the parent just before it forks the pool).
_FORK_ROWS: RowsFn | None = None


def die_with_parent(parent: int) -> None:
    """Make this process (a worker) exit when the parent does, even by ``kill -9``: orphaned workers would otherwise wait
    on their task pipe forever (the forked children hold its write end too, so they never see EOF).

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, set up by the kernel; elsewhere a thread that watches the
    parent pid. Workers write no file (the parent writes every row), so SIGKILL loses nothing.
    """
    import signal
    import threading

    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            pr_set_pdeathsig = 1
            armed = ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _worker_init(threads: int, parent: int, close_fds: Sequence[int] = ()) -> None:
    import signal

    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent may turn SIGTERM into KeyboardInterrupt: not here
    for fd in close_fds:  # the parent's result-file locks: they must end with the parent, not with a worker
        with contextlib.suppress(OSError):
            os.close(fd)
    torch.set_num_threads(threads)


def _worker_rows(idxs: list[int]) -> list[tuple[str, int]]:
    assert _FORK_ROWS is not None
    return _FORK_ROWS(idxs)


def cpu_workers_available() -> bool:
    """Worker processes need ``fork`` (Linux): they inherit the loaded model instead of pickling it."""
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


def _worker_death(procs: Mapping[int, Any]) -> UserError:
    """One line naming the worker that died (e.g. killed by the out-of-memory killer) and how to go on."""
    import signal

    codes = {pid: p.exitcode for pid, p in procs.items()}
    # The pool terminates (SIGTERM) the other workers once one has died: name the first one.
    dead = [pid for pid, c in codes.items() if c not in (None, 0, -signal.SIGTERM)] or \
        [pid for pid, c in codes.items() if c not in (None, 0)]
    parts = []
    for pid in dead:
        code = codes[pid]
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            why = f"was killed by {name}" + (" (the out-of-memory killer does that)" if code == -signal.SIGKILL else "")
        else:
            why = f"exited with status {code}"
        parts.append(f"worker process {pid} {why}")
    what = "; ".join(parts) or "a worker process died"
    return UserError(f"{what}; the rows written so far are kept: rerun the same command to resume (with fewer "
                     "--workers, or --workers 1, if memory is short)")


def map_groups(rows: RowsFn, groups: list[list[int]], workers: int,
               close_fds: Sequence[int] = ()) -> Iterator[list[tuple[str, int]]]:
    """Yield ``rows(g)`` for each group in order; with ``workers > 1``, computed by forked processes with
    ``torch.get_num_threads() // workers`` threads each. ``close_fds`` (the parent's result-file locks) are
    closed in the workers, so the locks end with the parent. Results are the same either way: every image has
    its own seeded generator.
    """
    global _FORK_ROWS
    if workers <= 1 or len(groups) <= 1:
        for g in groups:
            yield rows(g)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, torch.get_num_threads() // workers)
    _FORK_ROWS = rows
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_worker_init, initargs=(threads, os.getpid(), tuple(close_fds)))
    pending: deque = deque()
    procs: dict[int, Any] = {}
    it = iter(groups)
    try:
        for g in it:  # keep every worker busy with two groups in flight, results taken in order
            pending.append(pool.submit(_worker_rows, g))
            procs.update(getattr(pool, "_processes", None) or {})
            if len(pending) >= 2 * workers:
                break
        while pending:
            fut = pending.popleft()
            while not wait([fut], timeout=0.5).done:
                pass  # wake up twice a second: a signal that reached another thread (kill's SIGTERM) runs now
            done = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_worker_rows, nxt))
            yield done
    except BrokenProcessPool:
        procs.update(getattr(pool, "_processes", None) or {})
        pool.shutdown(wait=True, cancel_futures=True)  # the pool stops the other workers; then read exit codes
        raise _worker_death(procs) from None
    except BaseException:
        # Interrupted (Ctrl-C, an error, or the consumer stopped): stop the workers now rather than let them
        # finish images whose rows would not be written; the next run resumes after the last written row.
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        raise
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        _FORK_ROWS = None

