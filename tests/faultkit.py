"""Running duch commands as real processes that tests SIGKILL, fast enough to do it many times.

Starting `python cli.py ...` costs ~5 s of imports on a 2-core machine (torch, open_clip, h5py), longer than the
tiny stages themselves, so killing a stage twenty times that way would mostly kill imports. A `Zygote` is one
Python process that imports everything once and then forks a child per command: each child is a real process
running the real CLI (`cli.main` with the command's arguments, exactly what `python cli.py ...` runs), with its
own pid, killed by a real SIGKILL at any point of its work. The zygote computes nothing itself before forking,
so no thread pool of torch's is alive to be broken by the fork.

A zygote can also be started inside a user and mount namespace (`unshare`, no root needed) where a small tmpfs
or a read-only bind mount stands in for a full or read-only disk: the children then meet real ENOSPC and EROFS
errors from the kernel. The test reads that namespace's files through /proc/PID/root.

An optional fault plan injects failures into a child from inside, at the operating-system boundary only
(`os.fsync` of the Nth temporary shard raises ENOSPC, as a delayed-allocation filesystem reports a full disk at
fsync); the code under test is never replaced.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_SOURCE = r"""
import errno, json, os, sys, traceback
from duch import cli  # this checkout's: conftest puts it first on PYTHONPATH
import duch.stages.extract, duch.stages.train_hash, duch.stages.encode_archive, duch.stages.evaluate  # noqa: E401
import h5py, open_clip, safetensors.torch, tifffile  # noqa: E401,F401
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401
import duch.pipeline.encoders.openclip, duch.pipeline.formats.checkpoint  # noqa: E401,F401


def inject(plan):
    # Faults at the OS boundary: the Nth fsync of a file whose name contains plan["match"] fails with ENOSPC.
    if not plan:
        return
    real, seen = os.fsync, [0]

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if plan["match"] in name:
            seen[0] += 1
            if seen[0] == plan["nth"]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    os.fsync = fsync


def child(req):
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(req["cwd"])
    code = 0
    try:
        inject(req.get("fault"))
        cli.main.main(args=req["argv"], prog_name="duch")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "spawn":
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            child(req)
        reply = {"pid": pid}
    elif req["op"] == "wait":
        pid, status = os.waitpid(req["pid"], 0 if req["block"] else os.WNOHANG)
        reply = {"done": pid != 0, "code": os.waitstatus_to_exitcode(status) if pid else None}
    else:
        reply = {"error": f"unknown op {req['op']}"}
    print(json.dumps(reply), flush=True)
"""


@dataclass
class Outcome:
    code: int  # exit code, or -9 when SIGKILLed
    seconds: float
    log: str

    @property
    def killed(self) -> bool:
        return self.code == -signal.SIGKILL


class Zygote:
    def __init__(self, prefix: list[str] | None = None, setup: str = ""):
        """prefix: a command to run the zygote under (unshare ...); setup: shell commands run before it starts,
        inside that prefix (mounts)."""
        code = f"ROOT = {str(ROOT)!r}\n" + _SOURCE
        if prefix:
            script = f"{setup + ' && ' if setup else ''}exec {sys.executable} -c \"$0\""
            argv = [*prefix, "sh", "-c", script, code]
        else:
            argv = [sys.executable, "-c", code]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"the zygote did not start: {' '.join(argv[:-1])}")
        self.pid = json.loads(ready)["ready"]

    def _ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def spawn(self, argv: list[str], log: Path, fault: dict | None = None) -> int:
        return self._ask(op="spawn", argv=argv, log=str(log), cwd=str(ROOT), fault=fault)["pid"]

    def wait(self, pid: int, block: bool = True) -> int | None:
        reply = self._ask(op="wait", pid=pid, block=block)
        return reply["code"] if reply["done"] else None

    def run(self, argv: list[str], log: Path, kill_after: float | None = None, fault: dict | None = None,
            timeout: float = 120) -> Outcome:
        """Run a command to its end, or SIGKILL it `kill_after` seconds after it starts (if it still runs)."""
        t = time.monotonic()
        pid = self.spawn(argv, log, fault)
        deadline = t + (kill_after if kill_after is not None else timeout)
        code = None
        while code is None and time.monotonic() < deadline:
            time.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
            code = self.wait(pid, block=False)
        if code is None:
            os.kill(pid, signal.SIGKILL)
            code = self.wait(pid)
        return Outcome(code, time.monotonic() - t, Path(log).read_text())

    def root(self) -> Path:
        """This zygote's view of the file system (its mount namespace's), from outside."""
        return Path(f"/proc/{self.pid}/root")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def namespaces_work() -> bool:
    """Whether an unprivileged user + mount namespace can be made here (for tmpfs and read-only mounts)."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt && echo ok"], capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == "ok"


def as_unprivileged_prefix() -> list[str] | None:
    """A prefix that runs a command without the power to ignore file permissions: none needed when not root;
    as root, a user namespace mapping uid 1000 onto root (so root's files stay readable to it, as their owner,
    while a mode 0555 folder refuses it). None when neither is possible."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("unshare"):
        return None
    probe = subprocess.run(["unshare", "--user", "--map-user=1000", "--map-group=1000", "sh", "-c",
                            "d=$(mktemp -d) && chmod 555 $d && (touch $d/x 2>/dev/null && echo writable || "
                            "echo refused); rmdir $d"], capture_output=True, text=True)
    if probe.stdout.strip() != "refused":
        return None
    return ["unshare", "--user", "--map-user=1000", "--map-group=1000"]
