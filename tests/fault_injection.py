"""Kill a writer at its k-th file-system step, for every k (fault injection).

Child side: ``drive(prepare, write)`` runs, for k = 1, 2, ...: ``prepare()`` (the old state), then a forked writer
that runs ``write()`` with ``kill_at_step(k)`` in force, so its k-th file-system call SIGKILLs it before the call
runs. The fork spares each k the seconds of importing torch and transformers. After each writer the driver prints
``result <k> <exit status>`` and ``inspect``, then waits for the parent's ``go`` (the parent looks at the folder in
between). It stops after the first writer that completes.

Parent side: ``next_result`` reads that through ``tests.child_process`` (deadlines, exit status checked).
"""

from __future__ import annotations

import builtins
import io
import itertools
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterable

from ptv2_plugin import atomic_folder
from tests.child_process import GO, ChildProcess

INSPECT = "inspect"

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
        print(f"result {k} {code}\n{INSPECT}", flush=True)
        if sys.stdin.readline().strip() != GO:
            raise SystemExit("the parent did not say go")
        if code != -signal.SIGKILL:
            return
    raise SystemExit(f"the writer still had steps left after {max_steps}")


def next_result(child: ChildProcess) -> tuple[int, int]:
    """Parent side: (k, exit status of the writer killed at step k) once the driver waits for inspection."""
    lines = child.read_until(INSPECT)
    _, k, code = lines[-2].split()
    return int(k), int(code)


def inspect_every_kill(child: ChildProcess, inspect: Callable[[int], str]) -> list[str]:
    """Parent side, after the handshake: for each step k, ``inspect(k)`` checks the folder the killed writer left and
    names its state ("old" or "new"); the driver then goes on, until a writer finishes. Asserts that every step but
    the last was a SIGKILL, that kills before the swap keep the old state and the last run ends in the new one, and
    returns the killed calls (``killed_steps``)."""
    seen, kills, k = [], [], 0
    try:
        while True:
            k, code = next_result(child)
            seen.append(inspect(k))
            child.send(GO)
            if code == 0:
                break
            assert code == -signal.SIGKILL, "\n".join(child.output[-40:])
            kills.append(k)
        child.finish()
    finally:
        child.kill()
    steps = killed_steps(child)
    assert len(steps) == len(kills) == k - 1 and kills == list(range(1, k))
    assert seen[-1] == "new" and "old" in seen, seen
    return steps


def killed_steps(child: ChildProcess) -> list[str]:
    """The calls the writers were killed at, in order (``open(path)``, ``exchange(path)``, ...)."""
    return [line.split(": ", 1)[1] for line in child.output if line.startswith("killed at step")]
