"""Running the runs of a grid side by side: one process per group of cores, each run started once the runs it
starts from are done.

Why processes pinned to cores, not threads: on a CPU, one single-threaded process per core trains and
certifies a small ResNet almost twice as fast as one process with two threads (measured on the 2-core
development box, where a two-thread process also collapses under any other load). Each run is one spawned
process: its cores are set with ``sched_setaffinity`` (so certification's ``--workers auto`` sees them) and
torch uses that many threads. Runs write their own run directories and store entries; the timings file is
shared under a lock (``store.add_timing``).

Results: each run is computed as it would be alone, except that torch uses fewer intra-op threads, and CPU
kernels do not promise bit-identical sums across thread counts (the tests find identical files for small
models). A script that calls ``run_experiment(..., jobs=2)`` needs the ``if __name__ == "__main__":`` guard of
any ``multiprocessing`` spawn user.

Interrupts: Ctrl-C or SIGTERM stops every running run the way Ctrl-C stops one (each saved its last
checkpoint; certification keeps its rows); a rerun resumes. A run that fails stops the others the same way,
and its error is printed by the run itself. Children die with the parent, even by ``kill -9``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait

import torch

from smoothtransfer.errors import UserError
from smoothtransfer.smoothing.workers import die_with_parent
from smoothtransfer.utils import set_progress

#: seconds a stopped run has to write its checkpoint before it is killed
STOP_GRACE_S = 120.0


def available_cores() -> list[int]:
    """The CPU cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no pinning, count only
        return list(range(os.cpu_count() or 1))


def core_slots(jobs: int, cores: Sequence[int] | None = None) -> list[list[int]]:
    """``jobs`` disjoint groups of cores, as equal as they can be (more jobs than cores: one core each)."""
    cores = list(cores if cores is not None else available_cores())
    jobs = max(1, min(int(jobs), len(cores)))
    return [cores[i::jobs] for i in range(jobs)]


class _Prefixed:
    """A text stream that starts every line with ``prefix`` (two runs print into one terminal)."""

    def __init__(self, stream, prefix: str) -> None:
        self.stream, self.prefix, self.at_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for part in text.splitlines(keepends=True):
            out.append((self.prefix if self.at_start else "") + part)
            self.at_start = part.endswith(("\n", "\r"))
        self.stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def child_main(target: Callable[..., None], args: tuple, cores: list[int], parent: int, prefix: str) -> None:
    """Entry point of one run's process: pinned to ``cores``, dies with ``parent``; SIGTERM = Ctrl-C."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the parent, which stops us
    signal.signal(signal.SIGTERM, _raise_interrupt)
    set_progress(False)  # two processes' progress bars on one terminal line help nobody
    for stream in (sys.stdout, sys.stderr):  # whole lines, so that two runs' lines never mix in a log file
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    sys.stdout = _Prefixed(sys.stdout, prefix)
    sys.stderr = _Prefixed(sys.stderr, prefix)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    try:
        target(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun to resume", file=sys.stderr, flush=True)
        sys.exit(130)


def _stop(procs: Sequence[mp.process.BaseProcess]) -> None:
    """Stop the runs as Ctrl-C stops one, waiting for their checkpoints; a second Ctrl-C/SIGTERM meanwhile does
    not cut the wait short (the children would then be killed mid-epoch by their parent's death)."""
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _stop_now(procs)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _stop_now(procs: Sequence[mp.process.BaseProcess]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()  # SIGTERM: the run stops as on Ctrl-C
    for p in procs:
        p.join(STOP_GRACE_S)
        if p.is_alive():
            p.kill()
            p.join()


def run_parallel(order: Sequence, needs: Callable[[object], Sequence[str]], key: Callable[[object], str],
                 target: Callable[..., None], args_of: Callable[[object], tuple], jobs: int,
                 done: set[str], announce: Callable[[object, list[int]], None] | None = None) -> None:
    """Run ``target(*args_of(item))`` for every item of ``order`` (dependency order) in its own process, at most
    ``jobs`` at a time on disjoint cores; an item starts when every id in ``needs(item)`` is in ``done`` (ids of
    items not in ``order`` must be there already). Raises UserError naming the first run that failed, after
    stopping the others; KeyboardInterrupt after stopping all of them."""
    ctx = mp.get_context("spawn")  # a fresh interpreter per run: no forked threads or locks
    pending = list(order)
    running: dict[object, tuple] = {}  # sentinel -> (process, item, slot)
    free = core_slots(jobs)
    failed: tuple[str, int] | None = None
    try:
        while pending or running:
            while failed is None and free:
                ready = next((it for it in pending if all(d in done for d in needs(it))), None)
                if ready is None:
                    break
                pending.remove(ready)
                cores = free.pop(0)
                if announce:
                    announce(ready, cores)
                p = ctx.Process(target=child_main, name=f"run-{key(ready)}",
                                args=(target, args_of(ready), cores, os.getpid(), f"[{key(ready)}] "))
                p.start()
                running[p.sentinel] = (p, ready, cores)
            if not running:
                break
            for s in wait(list(running)):
                p, item, cores = running.pop(s)
                p.join()
                free.append(cores)
                if p.exitcode == 0:
                    done.add(key(item))
                elif failed is None:
                    failed = (key(item), p.exitcode)
                    _stop([q for q, _, _ in running.values()])
    except BaseException:  # Ctrl-C, SIGTERM, or a failure of the scheduler itself: stop the runs cleanly
        _stop([q for q, _, _ in running.values()])
        raise
    if failed is not None:
        rid, code = failed
        raise UserError(f"run '{rid}' failed (exit status {code}; its error is printed above); the runs beside "
                        f"it were stopped; rerun to resume")
    if pending:
        raise UserError(f"runs never became ready: {', '.join(key(i) for i in pending)}")
