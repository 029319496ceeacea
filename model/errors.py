"""The trainer's, evaluate's and predict's ways to stop: each is printed as one line."""
from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading


class UsageError(Exception):
    """A bad option or input: printed as one line, exit status 2, nothing written."""


class Diverged(Exception):
    """The training loss became non-finite: printed as one line, exit status 1."""


class RunFailed(Exception):
    """The run cannot go on (a full disk at a checkpoint, say): printed as one line, exit status 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, `kill`): stopped as Ctrl-C stops a command."""


def _terminate(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises Terminated in the main thread while the block runs (signal handlers live there;
    elsewhere, a test calling main() from a thread, the default stays)."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        yield
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def stopped(prog: str, e: KeyboardInterrupt, hint: str = "") -> int:
    """The one line of a command stopped by Ctrl-C (status 130) or SIGTERM (143), as a shell reports them."""
    how, status = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
    print(f"\n{prog}: {how}{'; ' + hint if hint else ''}", file=sys.stderr, flush=True)
    return status


def command(prog: str, hint: str = ""):
    """A command's main(): whatever stops it midway is one line and a non-zero status, never a traceback:
    Ctrl-C and SIGTERM 130 and 143 (never exit 0, which an atexit handler's complaint after a stray
    KeyboardInterrupt could leave), a damaged shard met mid-work (ShardError) and a file that cannot be
    written (OSError) 1. What main() checks before its work it reports itself, with status 2."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            from pipeline.shards import ShardError  # neither torch nor DALI: cheap for every tool
            with sigterm_as_interrupt():
                try:
                    return main(*args, **kwargs)
                except KeyboardInterrupt as e:
                    return stopped(prog, e, hint)
                except UsageError as e:  # met after main's own checks (a model fed crops of another size)
                    print(f"{prog}: {e}", file=sys.stderr)
                    return 2
                except ShardError as e:
                    print(f"{prog}: {e}", file=sys.stderr)
                    return 1
                except OSError as e:
                    print(f"{prog}: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
                    return 1
        return run
    return wrap
