"""The `code` reward: a completion's program against hidden tests, in the sandbox.

Hostile programs are written so that each would pass its tests if the sandbox let it do what
it tries (read a secret outside its directory, fetch a token over the network, write next
to the host's files): a pass means the containment failed, not that the program was good.
Each must score the fallback, be counted in reward/errors, leave no process and no file
behind, and the batch must end within the runner's timeout.
"""
from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from posttrain.rollout import RewardConfig, RewardRunner
from posttrain.rollout.rewards import code
from posttrain.rollout.sandbox import SandboxError, extract_program, run_tests

ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(0, 0) == 0\nassert add(20, 22) == 42"
GOOD = "def add(a, b):\n    return a + b\n"
UID_BASE = 2_000_000  # sandbox_launcher.UID_BASE: every sandboxed program runs as a uid above it
ROOT = os.geteuid() == 0


def test_scores_the_fraction_of_hidden_tests_passed():
    assert code(GOOD, ADD_TESTS) == 1.0
    assert code("def add(a, b):\n    return a * b\n", ADD_TESTS) == 0.25  # only add(0, 0) == 0 passes
    assert code(f"Here it is:\n```python\n{GOOD}```\nDone.", ADD_TESTS) == 1.0  # the fenced block
    assert code("add = lambda a, b: a + b  # and prose ( that is not code", ADD_TESTS) == 1.0
    assert code("def add(a, b) return a + b", ADD_TESTS) == 0.0  # not Python: wrong, not an error
    assert extract_program("```\nx = 1\n```") == "x = 1\n"


def test_the_tests_stay_hidden_and_a_fake_result_does_not_count():
    """The program cannot read its tests before they run, and printing a pass or leaving
    early with exit code 0 is not a pass."""
    cheat = ("import os, sys\nprint('ok 4 4')\nos.write(3, b'ok 4 4\\n')\nsys.stdout.flush()\nos._exit(0)\n")
    r = run_tests(cheat, ADD_TESTS.splitlines())
    assert r.outcome != "ok" and r.passed == 0
    peek = "import os\nfiles = os.listdir('.')\ndef add(a, b):\n    assert not files, files\n    return a + b\n"
    assert code(peek, ADD_TESTS) == 1.0  # its directory is empty: nothing of the job lies there


@pytest.fixture
def token_server():
    """A TCP server on the host's loopback that hands out a token to whoever connects."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"TOKEN-17")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def _sandbox_leftovers() -> tuple[list[int], list[str]]:
    procs = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real >= UID_BASE]
    tmp = Path(tempfile.gettempdir())
    dirs = sorted(p.name for p in tmp.glob("posttrain-sandbox-*")) + sorted(p.name for p in tmp.glob("posttrain-code-*"))
    return procs, dirs


@pytest.mark.skipif(not ROOT, reason="network, file-system and uid isolation need root (docs/sandbox.md)")
def test_hostile_programs_score_the_fallback_are_counted_and_contained(tmp_path, token_server):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    secret.chmod(0o644)
    outside = tmp_path / "escaped"
    tmp_path.chmod(0o777)  # writable by any uid: only the sandbox stops the write
    define = "def add(a, b):\n    return a + b\n"
    hostile = {
        "infinite loop": "while True:\n    pass\n" + define,
        "sleeps forever": "import time\ntime.sleep(10**6)\n" + define,
        "fork bomb": "import os\nwhile True:\n    os.fork()\n" + define,
        "fork and hide": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(10**6)\n" + define
                         + "import signal\nsignal.pause()\n",
        "memory bomb": "x = []\nwhile True:\n    x.append(bytearray(1 << 24))\n" + define,
        "disk fill, one file": "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))\n" + define,
        "disk fill, many files": "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n    i += 1\n"
                                 + define,
        "network": f"import socket\nTOKEN = socket.create_connection(('127.0.0.1', {token_server}), timeout=2)"
                   ".recv(64).decode()\ndef add(a, b):\n    return a + b if TOKEN == 'TOKEN-17' else None\n",
        "reads outside": f"SECRET = open({str(secret)!r}).read()\n"
                         "def add(a, b):\n    return a + b if SECRET == 'hunter2' else None\n",
        "writes outside": f"open({str(outside)!r}, 'w').write('x')\n" + define,
    }
    before = _sandbox_leftovers()
    texts = [*hostile.values(), GOOD]
    cfg = RewardConfig(fn="code", timeout_s=20.0, fallback=-1.0, num_workers=4)
    runner = RewardRunner(cfg)
    start = time.monotonic()
    rewards, metrics = runner.score(texts, [ADD_TESTS] * len(texts))
    elapsed = time.monotonic() - start
    by_name = dict(zip([*hostile, "good"], rewards))
    assert by_name == {**{k: -1.0 for k in hostile}, "good": 1.0}
    # counted: each is an error of the reward (the sandbox stopped it before the runner's timeout)
    assert metrics["reward/errors"] + metrics["reward/timeouts"] == len(hostile)
    # none slowed the batch beyond its timeout (each program is bounded by its wall limit, 5 s)
    assert elapsed < cfg.timeout_s, elapsed
    assert not outside.exists()
    assert _sandbox_leftovers() == before  # no process of a sandbox uid, no temp dir left
    # the good program was contained too, and said so
    assert set(run_tests(GOOD, ["assert add(1, 1) == 2"]).isolation) >= {"net", "pid", "fs", "disk", "uid"}


@pytest.mark.skipif(not ROOT, reason="needs root")
def test_each_limit_is_what_stops_its_program():
    """Which mechanism ended each program (so a test above cannot pass for a wrong reason)."""
    outcomes = {
        "while True:\n    pass\n": ("killed", "SIGKILL"),  # CPU-time limit
        "import time\ntime.sleep(10**6)\n": ("timeout", "wall-clock"),
        "x = bytearray(1 << 31)\n": ("crashed", "MemoryError"),  # address-space limit
        "open('big', 'wb').write(b'x' * (5 << 20))\n": ("crashed", "OSError"),  # file-size limit (EFBIG)
        "import os\n[os.fork() for _ in range(64)]\n": ("crashed", "BlockingIOError"),  # process limit
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n": ("crashed", "OSError"),
        "open('/etc/passwd').read()\n": ("crashed", "FileNotFoundError"),  # only system dirs are visible
    }
    for program, (outcome, detail) in outcomes.items():
        r = run_tests(program, ["assert True"])
        assert r.outcome == outcome and detail in r.detail, (program, r)
    with pytest.raises(SandboxError, match="killed"):
        code("while True:\n    pass\n", "assert True")
