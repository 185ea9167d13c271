"""Fault injection: SIGKILL the driver at a named point of a run (the fault tests use it).

`POSTTRAIN_KILL_AT=<point>` names one point; when the run reaches it the driver kills itself
with SIGKILL (no cleanup, no atexit, no flushing: what a crash or the OOM killer does), and
with it its whole process group when it leads one (`posttrain run` started in a new session:
the local Ray instance goes too). Points:

    step:<stage>:<n>      optimizer step n (1-based) of <stage> computed, not yet logged or saved
    checkpoint:<stage>:<n>  the resumable state after step n written into its temp dir, not yet renamed
    stage_done:<stage>    the stage's manifest written, the next stage not started
    learner:<n>           a learner rank about to run its n-th optimizer step of the stage (the
                          rank's own process dies: the driver sees a lost learner)

Unset (always, outside tests), `kill_point` is one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "POSTTRAIN_KILL_AT"


def kill_point(*parts: object) -> None:
    """SIGKILL this process (and its group, when it leads one) if POSTTRAIN_KILL_AT names this point."""
    spec = os.environ.get(ENV)
    if not spec or spec != ":".join(str(p) for p in parts):
        return
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
