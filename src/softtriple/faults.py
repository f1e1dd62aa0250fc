"""Named moments where the fault suite (tests/test_faults.py) kills this process, to prove that a
run killed exactly there resumes to the same result as an uninterrupted one.

Inactive unless $SOFTTRIPLE_KILL_AT is set: ``POINT:N`` sends this process SIGKILL the N-th time
it reaches POINT (``step``: after an optimizer step; ``logged``: after an epoch's log line,
before its checkpoint; ``checkpoint-write``: the checkpoint's temporary file written, not yet
renamed; ``evaluation``: test embeddings computed, metrics not yet).
"""

from __future__ import annotations

import os
import signal

POINTS = ("step", "logged", "checkpoint-write", "evaluation")
_arrivals: dict[str, int] = {}


def point(name: str) -> None:
    """Arrive at the moment ``name``; die here if $SOFTTRIPLE_KILL_AT says so."""
    spec = os.environ.get("SOFTTRIPLE_KILL_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _arrivals[name] = _arrivals.get(name, 0) + 1
    if _arrivals[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
