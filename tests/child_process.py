"""Child Python processes for tests, race-free and bounded in time.

Every child starts with a handshake: it prints ``ready`` once its interpreter runs and then waits until the parent
writes ``go`` on its stdin, so a parent that must look at something before the child moves on can. Every read has a
deadline (a reader thread feeds a queue; the parent never blocks on a pipe), the whole run has a timeout, and the exit
status is always checked. A child whose parent dies sees its stdin close and stops. Nothing here sleeps.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
READY, GO = "ready", "go"
_EOF = None

HANDSHAKE = (
    "import sys\n"
    f"print({READY!r}, flush=True)\n"
    f"if sys.stdin.readline().strip() != {GO!r}:\n"
    "    sys.exit('the parent did not say go')\n"
)


class ChildProcess:
    """A running child: ``read_until`` a line, ``send`` a line, then ``finish`` (exit status checked) or ``kill``."""

    def __init__(self, process: subprocess.Popen, timeout: float) -> None:
        self.process = process
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(_EOF)

    def _remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def _fail(self, why: str) -> NoReturn:
        self.kill()
        tail = "\n".join(self.output[-60:])
        raise AssertionError(f"child process {why}; its last output:\n{tail}")

    def read_until(self, expected: str) -> list[str]:
        """Lines up to and including ``expected``; fails if the child exits or the deadline passes first."""
        seen: list[str] = []
        while True:
            try:
                line = self._lines.get(timeout=self._remaining())
            except queue.Empty:
                self._fail(f"did not print {expected!r} within {self.timeout:.0f} s")
            if line is _EOF:
                self._fail(f"exited (status {self.process.wait(timeout=5)}) before printing {expected!r}")
            self.output.append(line)
            seen.append(line)
            if line.strip() == expected:
                return seen

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def finish(self, expected_returncode: int = 0) -> str:
        """Wait for the end within the deadline, check the exit status, and return everything the child printed."""
        self.process.stdin.close()
        try:
            returncode = self.process.wait(timeout=self._remaining())
        except subprocess.TimeoutExpired:
            self._fail(f"did not finish within {self.timeout:.0f} s")
        self._reader.join(timeout=self._remaining() + 5)
        while not self._lines.empty():
            line = self._lines.get_nowait()
            if line is not _EOF:
                self.output.append(line)
        if returncode != expected_returncode:
            self._fail(f"exited with status {returncode}, expected {expected_returncode}")
        return "\n".join(self.output)

    def kill(self) -> int:
        """SIGKILL the child and reap it; returns its exit status (``-SIGKILL`` unless it had already ended)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        return self.process.wait(timeout=30)


def start_python(
    code: str | None = None,
    *,
    module: str | None = None,
    args: Sequence[str] = (),
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> ChildProcess:
    """Start ``python -c code args`` (or ``python -m module args``) and complete the handshake."""
    if (code is None) == (module is None):
        raise ValueError("pass code or module")
    if module is not None:
        code = (f"import runpy\nsys.argv[0] = {module!r}\n"
                f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), environment.get("PYTHONPATH", "")) if p)
    environment["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        [sys.executable, "-c", HANDSHAKE + code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=environment,
    )
    child = ChildProcess(process, timeout)
    child.read_until(READY)
    child.send(GO)
    return child


def run_python(
    code: str | None = None,
    *,
    module: str | None = None,
    args: Sequence[str] = (),
    timeout: float,
    env: Mapping[str, str] | None = None,
    expected_returncode: int = 0,
) -> str:
    """Run a child to its end (handshake, deadline, exit status checked) and return its output."""
    child = start_python(code, module=module, args=args, timeout=timeout, env=env)
    return child.finish(expected_returncode)
