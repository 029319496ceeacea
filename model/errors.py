"""The trainer's, evaluate's and predict's ways to stop: each is printed as one line."""
from __future__ import annotations


class UsageError(Exception):
    """A bad option or input: printed as one line, exit status 2, nothing written."""


class Diverged(Exception):
    """The training loss became non-finite: printed as one line, exit status 1."""


class RunFailed(Exception):
    """The run cannot go on (a full disk at a checkpoint, say): printed as one line, exit status 1."""
