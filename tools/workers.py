"""The worker processes of the tools' pools (make_shards, compute_pca): they leave Ctrl-C and SIGTERM to
the main process, which stops them, and the kernel ends them if that process dies however it dies."""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def init_worker_signals(parent: int) -> None:
    """In a worker: Ctrl-C is the main process's to handle (one line, not N tracebacks), and so is a
    SIGTERM sent to the main process alone; a SIGTERM to the whole group ends the worker as usual (a worker
    forked inside signals_held() inherits the block: lifted here)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
    die_with(parent)


HELD = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM held back while work is handed to a pool: a KeyboardInterrupt raised inside the
    executor's submit can leave its queue's lock taken, and the shutdown that follows then waits for good
    (seen: a signal in the first milliseconds hung compute_pca in 1 run of 2 under load). Delivered as the
    block ends, where the caller's handler stops the workers."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def die_with(parent: int) -> None:
    """Linux: the kernel kills this worker when the main process dies, however it dies (a SIGKILL
    gives it no chance to stop its workers): no orphan goes on working and holding the output pipes."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: workers end when they next find the pool gone
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


@contextlib.contextmanager
def workers_stopped_first(pool):
    """While the block runs, Ctrl-C and SIGTERM first kill the pool's workers, in the signal handler, and
    then raise as usual (KeyboardInterrupt, or model.errors.Terminated): whatever the main thread was waiting
    for inside the executor, nothing is left for it to wait on (an interrupt met in the executor's own code
    could otherwise wait for the workers' shards: seen as a rare hang under load)."""
    from model.errors import Terminated

    def stop(signum, frame):
        _kill(pool)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    previous = {s: signal.signal(s, stop) for s in HELD}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def kill_workers(pool) -> None:
    """Stop a ProcessPoolExecutor's workers now, not after their tasks (Ctrl-C, SIGTERM, a refusal). The
    pool's own thread then fails every pending future as broken; no future may be cancelled first (that
    thread's set_exception on a cancelled future is an InvalidStateError traceback), so this waits for it."""
    _kill(pool)
    pool.shutdown(wait=True)


def _kill(pool) -> None:
    for process in list((getattr(pool, "_processes", None) or {}).values()):  # no public way to kill them
        process.kill()
