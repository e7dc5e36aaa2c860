"""Child processes with a log file and a health wait: the shared part of the SGLang server and router launchers.

A server that dies or never answers must fail with its own last log lines in the message (a CUDA OOM, a bad flag,
a missing model), not with "connection refused" from a later request.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx


class LaunchError(RuntimeError):
    """A server or router did not come up; the message ends with the last lines of its log."""


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> Any:
    """A `preexec_fn` that makes the child get SIGKILL when its parent dies (Linux `PR_SET_PDEATHSIG`), so a
    driver or actor killed without a `stop()` leaves no orphan server behind; None where prctl is missing.

    The signal follows the parent *thread*: start servers from a thread that lives as long as they should (the
    driver's main thread, an actor's method). libc is looked up here, in the parent: between fork and exec the
    child only makes the two calls."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)

    return preexec


class ManagedProcess:
    """`Popen` with stdout+stderr in a log file, a liveness-aware HTTP readiness wait and a clean stop. The process
    dies with its parent (see `_die_with_parent`)."""

    def __init__(self, argv: list[str], name: str, log_path: str | Path | None = None, env: dict | None = None):
        self.argv, self.name = list(argv), name
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"streamrl-{name.replace(' ', '_')}-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            try:  # own session: stop() ends the whole tree (SGLang starts scheduler/detokenizer children)
                self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env={**os.environ, **(self.env or {})}, start_new_session=True,
                                             preexec_fn=_die_with_parent())
            except OSError as e:
                raise LaunchError(f"{self.name}: cannot start {self.argv[0]!r}: {e}") from e
        return self

    def tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(collections.deque(f, maxlen=n))
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def fail(self, why: str) -> LaunchError:
        return LaunchError(f"{self.name}: {why}\ncommand: {' '.join(self.argv)}\nlog {self.log_path}, last lines:\n"
                           f"{self.tail()}")

    def wait_ready(self, url: str, timeout: float, poll: float = 0.2) -> None:
        """Poll `url` until it answers 2xx; LaunchError (with the log tail) if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0)) as client:
            while True:
                if not self.alive():
                    code = None if self.proc is None else self.proc.returncode
                    raise self.fail(f"exited with code {code} before {url} answered")
                try:
                    if client.get(url).is_success:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    self.stop()
                    raise self.fail(f"{url} did not answer within {timeout:.0f}s (process stopped)")
                time.sleep(poll)  # polling a condition, with the process checked on every round

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL after `timeout` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                continue
