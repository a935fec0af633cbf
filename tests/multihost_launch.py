"""Launch N local JAX processes forming one global CPU mesh, as tests do (``jax.distributed`` on localhost).

Each process runs ``python <script> <args>`` with, in its environment::

    GROUPOPT_PROCESS_ID, GROUPOPT_NUM_PROCESSES, GROUPOPT_COORDINATOR   (localhost:<free port>)
    XLA_FLAGS=--xla_force_host_platform_device_count=<devices per process>

and calls :func:`init` first thing (before building arrays). :func:`launch` waits for all of them
with a deadline, kills every process (its whole session) on timeout or when one fails and the
others do not follow within a grace period, and returns each one's exit code and output. The
children's files live in a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Proc:
    index: int
    returncode: int | None  # None: killed at the deadline
    stdout: str
    stderr: str

    def lines(self, prefix: str) -> list[str]:
        """What follows ``prefix + " "`` on the stdout lines that carry it (see :func:`tagged`)."""
        return tagged(self.stdout.splitlines(), prefix)


def tagged(lines, prefix: str) -> list[str]:
    """What follows ``prefix + " "`` on each line that starts with it or carries it after a space. Gloo's own
    log lines ("[Gloo] Rank 0 is connected to ...") share the processes' stdout and are written in pieces by
    several threads, so one of its fragments can end up in front of a line a process printed."""
    pat = re.compile(r"(?:^|\s)" + re.escape(prefix) + r" (.*)$")
    return [m[1] for ln in lines if (m := pat.search(ln))]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def launch(script: str, n: int, args=(), *, devices: int = 8, timeout: float = 300, grace: float = 30,
           env=None, on_start=None) -> list[Proc]:
    """Run ``script`` as ``n`` processes with ``devices // n`` CPU devices each; see the module docstring.

    ``env``: extra environment variables, or a function ``(process index, coordinator address)`` giving them.
    ``on_start(popens)`` (optional) is called once all are started (e.g. to kill one mid-run).
    A process still running at ``timeout`` seconds, or ``grace`` seconds after another one failed,
    is killed and reported with ``returncode=None``.
    """
    if devices % n:
        raise ValueError(f"{devices} devices do not divide over {n} processes")
    port = free_port()
    work = tempfile.mkdtemp(prefix="groupopt-mp-")
    popens, files = [], []
    try:
        for i in range(n):
            child = dict(os.environ)
            child.update((env(i, f"localhost:{port}") if callable(env) else env) or {})
            child.update(
                GROUPOPT_PROCESS_ID=str(i),
                GROUPOPT_NUM_PROCESSES=str(n),
                GROUPOPT_COORDINATOR=f"localhost:{port}",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices // n}",
                JAX_PLATFORMS="cpu",
                PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), child.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            )
            out = open(os.path.join(work, f"{i}.out"), "w+")
            err = open(os.path.join(work, f"{i}.err"), "w+")
            files.append((out, err))
            popens.append(subprocess.Popen([sys.executable, script, *map(str, args)], stdout=out, stderr=err,
                                           env=child, cwd=ROOT, start_new_session=True))
        if on_start is not None:
            on_start(popens)
        deadline = time.monotonic() + timeout
        failed_at = None
        while True:
            codes = [p.poll() for p in popens]
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + grace):
                break
            time.sleep(0.05)
    finally:
        killed = [p.poll() is None for p in popens]
        for p in popens:
            _kill(p)
    results = []
    for i, (p, (out, err)) in enumerate(zip(popens, files)):
        out.seek(0)
        err.seek(0)
        results.append(Proc(i, None if killed[i] else p.returncode, out.read(), err.read()))
        out.close()
        err.close()
    for name in os.listdir(work):
        os.remove(os.path.join(work, name))
    os.rmdir(work)
    return results


def check(results: list[Proc]) -> list[Proc]:
    """Assert every process exited 0; the failure message carries each failed one's stderr tail."""
    bad = [r for r in results if r.returncode != 0]
    if bad:
        msg = "\n".join(f"--- process {r.index}: " + ("killed at the deadline" if r.returncode is None else f"exit {r.returncode}")
                        + "\n" + _tail(r.stderr) for r in bad)
        raise AssertionError(msg)
    return results


def _tail(text: str, n: int = 3000) -> str:
    text = "\n".join(ln for ln in text.splitlines() if not ln.startswith("[Gloo]"))
    return text[-n:]


# ------------------------------------------------------------------ the child side


def init():
    """In a launched process: join the others (a no-op with one process); returns ``(process_id, n)``.

    CPU collectives across processes go through Gloo (``jax_cpu_collectives_implementation``)."""
    import jax

    pid = int(os.environ.get("GROUPOPT_PROCESS_ID", "0"))
    n = int(os.environ.get("GROUPOPT_NUM_PROCESSES", "1"))
    if n > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=os.environ["GROUPOPT_COORDINATOR"], num_processes=n, process_id=pid)
    return pid, n
