"""Runs one untrusted program against its tests, contained; started by posttrain.rollout.sandbox.

A script, not a module of the package: `python -I -S -B sandbox_launcher.py` (isolated, no
site-packages, standard library only), so it starts in a fresh single-threaded process
(forking a threaded trainer to set up namespaces is not safe). Reads the job as JSON on stdin
({"program", "tests", "limits"}), writes one JSON line on stdout:

    {"outcome": "ok" | "syntax_error" | "crashed" | "killed" | "timeout", "passed", "total",
     "detail", "isolation": [...]}

Layout: this process (root or not) sets up isolation, forks the program's process, feeds it
the job through a pipe and waits for it under a wall-clock deadline. As root: new mount,
network, PID and IPC namespaces; a size-limited tmpfs as the root file system holding only
read-only binds of the system and Python directories, /dev/null|zero|urandom, an empty /tmp
and the working directory /work; the program runs as an unprivileged uid of its own (no
groups) as PID 1 of its namespace, so when it ends or is killed every process it forked
goes too. Not root: only resource limits, a throwaway directory and the deadline (see
docs/sandbox.md). Either way: CPU time, address space, file size, process count and open
files are limited (setrlimit) and the program never sees the tests before it runs.
"""
import ctypes
import fcntl
import json
import os
import resource
import select
import signal
import sys
import tempfile
import time

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWIPC = 0x00020000, 0x40000000, 0x20000000, 0x08000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
MNT_DETACH = 2
UID_BASE = 2_000_000  # + this launcher's pid: a uid no other process (or sandbox) runs as

# Runs inside the sandbox (python -c): reads the job from fd 4, runs the program, then each
# test in a copy of the program's namespace, and reports on fd 3 with the job's nonce.
HARNESS = r'''
import json, os
def _harness():
    chunks = []
    while True:
        b = os.read(4, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(4)
    job = json.loads(b"".join(chunks))
    nonce, tests = job["nonce"], job["tests"]
    out = os.fdopen(3, "w")
    def report(*words):
        out.write(" ".join([nonce, *map(str, words)]) + "\n")
        out.flush()
    try:
        code = compile(job["program"], "solution.py", "exec")
    except BaseException as e:
        report("syntax_error", type(e).__name__)
        return
    del job
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(code, ns)
    except BaseException as e:
        report("crashed", type(e).__name__)
        return
    passed = 0
    for t in tests:
        try:
            exec(compile(t, "<test>", "exec"), dict(ns))
            passed += 1
        except BaseException:
            pass
    report("ok", passed, len(tests))
_harness()
'''

libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _bind_ro(src: str, root: str) -> None:
    """src (a directory or file) at the same path under root, read-only."""
    dst = root + src
    if os.path.islink(src):  # /bin -> usr/bin on merged-/usr systems
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.lexists(dst):
            os.symlink(os.readlink(src), dst)
        return
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    _mount(src, dst, None, MS_BIND | MS_REC)
    _mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _isolate(limits: dict, python: str) -> tuple[list, str]:
    """As root: namespaces + a private root file system. Returns (isolation, new root or '')."""
    done: list = []
    if os.geteuid() != 0:
        return done, ""
    try:
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC), "unshare")
    except OSError:
        return done, ""  # e.g. a container without CAP_SYS_ADMIN: limits only
    done += ["net", "pid", "ipc"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    root = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={int(limits['disk_mb'])}m,mode=755")
    prefix = os.path.realpath(sys.base_prefix)
    for src in ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", prefix, os.path.dirname(python)]:
        if os.path.lexists(src) and not os.path.lexists(root + src):
            _bind_ro(src, root)
    for dev in ("/dev/null", "/dev/zero", "/dev/urandom"):
        _bind_ro(dev, root)
        _mount(None, root + dev, None, MS_REMOUNT | MS_BIND | MS_NOSUID)  # writable null, still nosuid
    os.makedirs(root + "/tmp", mode=0o1777, exist_ok=True)
    os.chmod(root + "/tmp", 0o1777)
    os.makedirs(root + "/work", exist_ok=True)
    done += ["fs", "disk"]
    return done, root


def _program(job_r: int, result_w: int, out_w: int, root: str, limits: dict, python: str, uid: int) -> None:
    """The forked child: confine, then exec the harness (never returns)."""
    try:
        # move every source above 0..4 first, so no dup2 below overwrites another source
        devnull, out_w, result_w, job_r = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in
                                           (os.open(os.devnull, os.O_RDONLY), out_w, result_w, job_r))
        for src, dst in ((devnull, 0), (out_w, 1), (out_w, 2), (result_w, 3), (job_r, 4)):
            os.dup2(src, dst)
        os.closerange(5, 1 << 16)
        if root:
            os.chroot(root)
            os.chown("/work", uid, uid)
            os.chmod("/work", 0o700)
        else:
            os.setpgid(0, 0)
        os.chdir("/work" if root else os.environ.get("SANDBOX_WORKDIR", "."))
        mb = 1 << 20
        for res, value in ((resource.RLIMIT_CPU, limits["cpu_s"]), (resource.RLIMIT_AS, limits["memory_mb"] * mb),
                           (resource.RLIMIT_FSIZE, limits["file_mb"] * mb), (resource.RLIMIT_NPROC, limits["processes"]),
                           (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
            soft = int(value)
            resource.setrlimit(res, (soft, soft + 1 if res == resource.RLIMIT_CPU else soft))
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
        env = {"PATH": "/usr/bin:/bin", "HOME": "/work" if root else ".", "LANG": "C.UTF-8"}
        os.execve(python, [python, "-I", "-S", "-B", "-c", HARNESS], env)
    finally:
        os._exit(127)


def main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    limits, python = job["limits"], job["python"]
    isolation, root = _isolate(limits, python)
    nonce = os.urandom(16).hex()
    job_r, job_w = os.pipe()
    result_r, result_w = os.pipe()
    out_r, out_w = os.pipe()
    uid = UID_BASE + os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(job_w)
        os.close(result_r)
        os.close(out_r)
        _program(job_r, result_w, out_w, root, limits, python, uid)
    for fd in (job_r, result_w, out_w):
        os.close(fd)
    if root or os.geteuid() == 0:
        isolation.append("uid")
    payload = json.dumps({"nonce": nonce, "program": job["program"], "tests": job["tests"]}).encode()
    deadline = time.monotonic() + float(limits["wall_s"])
    result, out, status = b"", b"", None
    pending = payload
    open_fds = {result_r, out_r}
    while status is None:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        writers = [job_w] if pending else []
        r, w, _ = select.select(list(open_fds), writers, [], min(left, 0.05))
        if w:
            try:
                n = os.write(job_w, pending[: 1 << 16])
                pending = pending[n:]
            except OSError:
                pending = b""
            if not pending:
                os.close(job_w)
        for fd in r:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.discard(fd)
            elif fd == result_r:
                result = (result + chunk)[-4096:]
            else:
                out = (out + chunk)[-4096:]  # a program that prints without end keeps only a tail
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
    timed_out = status is None
    if timed_out:
        os.kill(pid, signal.SIGKILL)  # PID 1 of its namespace (root): the whole namespace goes
        if not root:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        _, status = os.waitpid(pid, 0)
    elif not root:
        try:  # whatever it forked and left behind in its group
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    report = {"isolation": isolation, "passed": 0, "total": len(job["tests"]), "detail": ""}
    lines = [ln.split() for ln in result.decode("utf-8", "replace").splitlines()]
    mine = [ln[1:] for ln in lines if ln and ln[0] == nonce]
    tail = out.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    if timed_out:
        report.update(outcome="timeout", detail=f"wall-clock limit {limits['wall_s']} s")
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        report.update(outcome="killed", detail=f"signal {signal.Signals(sig).name} ({tail[0][:200]})")
    elif mine and mine[-1][0] == "ok" and os.WEXITSTATUS(status) == 0:
        report.update(outcome="ok", passed=int(mine[-1][1]), total=int(mine[-1][2]))
    elif mine and mine[-1][0] == "syntax_error":
        report.update(outcome="syntax_error", detail=mine[-1][1])
    else:
        what = mine[-1][1] if mine and len(mine[-1]) > 1 else f"exit code {os.WEXITSTATUS(status)}"
        report.update(outcome="crashed", detail=f"{what} ({tail[0][:200]})")
    if root:  # the tmpfs goes with this mount namespace; its empty mount point stays on the host
        libc.umount2(root.encode(), MNT_DETACH)
        try:
            os.rmdir(root)
        except OSError:
            pass
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
