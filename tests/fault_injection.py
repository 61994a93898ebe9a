"""Kill a writer at its k-th file-system step, for every k, and drive such a child process from a test safely.

Child side: ``drive(prepare, write)`` runs, for k = 1, 2, ...: ``prepare()`` (the old state), then a forked writer
that runs ``write()`` with ``kill_at_step(k)`` in force, so its k-th file-system call SIGKILLs it before the call
runs. The fork spares each k the seconds of importing torch and transformers. After each writer the driver prints
``result <k> <exit code>`` and waits for the parent's ``go`` (the parent inspects the folder in between). It stops
after the first writer that completes.

Parent side: ``Child`` reads the child's output with a deadline on every read and writes handshake lines.
"""

from __future__ import annotations

import builtins
import io
import itertools
import os
import queue
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterable

from ptv2_plugin import atomic_folder

# Every call that creates, writes, renames, links, syncs or deletes something, as the code under test reaches it.
OS_STEPS = ("mkdir", "rename", "replace", "link", "symlink", "unlink", "remove", "rmdir", "fsync")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def kill_at_step(k: int, extra: Iterable[tuple[object, str]] = ()) -> None:
    """Patch the file-system calls so that the k-th one prints ``killed at step k: <call>`` and SIGKILLs us."""
    counter = itertools.count(1)

    def patch(owner, name: str, is_step: Callable[..., bool] | None = None) -> None:
        original = getattr(owner, name)

        def step(*args, **kwargs):
            if is_step is None or is_step(*args, **kwargs):
                number = next(counter)
                if number == k:
                    sys.stdout.write(f"killed at step {number}: {name}({args[0] if args else ''})\n")
                    sys.stdout.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(owner, name, step)

    def opens_for_writing(file, mode="r", *args, **kwargs) -> bool:
        return any(flag in kwargs.get("mode", mode) for flag in "wax+")

    for name in OS_STEPS:
        patch(os, name)
    patch(os, "open", lambda path, flags, *args, **kwargs: bool(flags & _WRITE_FLAGS))
    open_step = None
    for owner in (builtins, io):  # builtins.open and io.open are one function; pathlib calls io.open
        if open_step is None:
            patch(owner, "open", opens_for_writing)
            open_step = owner.open
        else:
            owner.open = open_step
    patch(atomic_folder, "exchange")
    for owner, name in extra:
        patch(owner, name)


def drive(prepare: Callable[[], None], write: Callable[[], None], extra: Iterable[tuple[object, str]] = (),
          max_steps: int = 500) -> None:
    """Child side of the protocol described in the module docstring."""
    extra = list(extra)
    for k in range(1, max_steps + 1):
        prepare()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                kill_at_step(k, extra)
                write()
                code = 0
            except BaseException:
                traceback.print_exc(file=sys.stdout)
            finally:
                sys.stdout.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(f"result {k} {code}", flush=True)
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("the parent did not say go")
        if code != -signal.SIGKILL:
            return
    raise SystemExit(f"the writer still had steps left after {max_steps}")


class Child:
    """A Python child process: output read line by line with deadlines, handshake lines written to its stdin."""

    def __init__(self, code: str, *args: str, cwd: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, prefix: str, timeout: float) -> str:
        """The next output line starting with ``prefix``; AssertionError if none arrives within ``timeout`` s."""
        try:
            while True:
                line = self._queue.get(timeout=timeout)
                if line is None:
                    raise AssertionError(f"the child ended before printing {prefix!r}:\n" + self.output())
                self.lines.append(line)
                if line.startswith(prefix):
                    return line
        except queue.Empty:
            raise AssertionError(f"no {prefix!r} from the child within {timeout} s:\n" + self.output()) from None

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def finish(self, timeout: float) -> int:
        """Wait for the child to exit (at most ``timeout`` s) and return its exit status."""
        self.process.stdin.close()
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
