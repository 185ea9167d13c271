"""Run an untrusted program against test cases, contained (the `code` reward's engine).

`run_tests(program, tests, limits)` starts `sandbox_launcher.py` in a fresh isolated Python
process and returns what happened to the program: its tests passed (`ok`, with the count),
it was not Python (`syntax_error`), it raised before its tests ran (`crashed`), a limit
killed it (`killed`) or it ran past the wall-clock limit (`timeout`). What contains it,
as root (CI, containers) and otherwise, is in docs/sandbox.md and the launcher's docstring.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use."""

    cpu_s: float = 2.0  # CPU seconds (RLIMIT_CPU; killed after)
    wall_s: float = 5.0  # wall-clock seconds from start to the last test (then killed)
    memory_mb: int = 512  # address space (RLIMIT_AS)
    file_mb: int = 4  # largest file it may write (RLIMIT_FSIZE)
    disk_mb: int = 32  # all it may write together (root: the size of its tmpfs)
    processes: int = 16  # processes of its uid at once (RLIMIT_NPROC; root: a uid of its own)


@dataclass(frozen=True)
class SandboxResult:
    outcome: str  # ok | syntax_error | crashed | killed | timeout
    passed: int  # tests passed (outcome ok)
    total: int  # tests given
    detail: str = ""  # why it did not finish (exception type, signal, limit)
    isolation: tuple[str, ...] = field(default=())  # what held: net, pid, ipc, fs, disk, uid (root only)


class SandboxError(RuntimeError):
    """The program did not run to the end of its tests (crashed, killed by a limit, timed out)."""


def run_tests(program: str, tests: Sequence[str], limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `program`, then each of `tests` (Python statements, usually asserts) in a copy of its
    namespace, in the sandbox. Returns within about limits.wall_s (+ process start)."""
    job = {"program": program, "tests": list(tests), "python": os.path.realpath(sys.executable),
           "limits": {"cpu_s": limits.cpu_s, "wall_s": limits.wall_s, "memory_mb": limits.memory_mb,
                      "file_mb": limits.file_mb, "disk_mb": limits.disk_mb, "processes": limits.processes}}
    workdir = tempfile.mkdtemp(prefix="posttrain-code-")  # the working directory when not root
    env = {"PATH": "/usr/bin:/bin", "SANDBOX_WORKDIR": workdir}
    try:
        proc = subprocess.run([job["python"], "-I", "-S", "-B", str(LAUNCHER)], input=json.dumps(job).encode(),
                              capture_output=True, env=env, timeout=limits.wall_s + 30, start_new_session=True)
        lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
        if proc.returncode != 0 or not lines:
            err = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            raise SandboxError(f"sandbox launcher failed: {err[0][:300]}")
        r = json.loads(lines[-1])
    except subprocess.TimeoutExpired:
        raise SandboxError("sandbox launcher did not answer") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return SandboxResult(r["outcome"], int(r["passed"]), int(r["total"]), r["detail"], tuple(r["isolation"]))


def extract_program(text: str) -> str:
    """The program in a completion: the first fenced code block (```python ... ```), else the
    whole text."""
    start = text.find("```")
    if start < 0:
        return text
    body = text[start + 3:]
    newline = body.find("\n")
    tag = body[:newline].strip() if newline >= 0 else None
    if tag is not None and (not tag or tag.isidentifier()):  # the fence's line: empty or a language tag
        body = body[newline + 1:]
    end = body.find("```")
    return body if end < 0 else body[:end]
