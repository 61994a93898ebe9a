"""Replace a whole folder in one step: a reader sees the old folder whole or the new one whole, never a mix, never
nothing.

A save writes files that only make sense together (an adapter's config and its weights; an export's graphs and
their metadata). Renaming them into place one by one leaves a mix for a moment, and for good when the process is
killed in between. So a save first writes a complete sibling folder (``.{name}.ptv2-new-{hex}``), makes it durable
(fsync), then swaps it with the destination in one system call:

- Linux: ``renameat2(RENAME_EXCHANGE)`` swaps the two directory entries atomically. There is no moment without the
  folder, the path the user passed stays a real folder, and the old content ends up under the staging name, from
  which it is deleted. We chose this over a symlink flip (``os.replace`` of a symlink is atomic as well) because a
  symlink changes what the user's path is: ``shutil.rmtree`` refuses it (the Trainer's checkpoint rotation deletes
  folders that way), a copy to another machine copies a link, and a real folder already there cannot become a link
  atomically.
- Elsewhere (no ``renameat2``, or a file system without RENAME_EXCHANGE): the old folder is renamed aside
  (``.{name}.ptv2-old-{hex}``), then the new one renamed in. Between the two renames the path does not exist; a kill
  there leaves the complete old folder aside, and the next save to the same path renames it back first.

What else keeps a user's files safe:
- Only entries this scheme names (``.{name}.ptv2-new-*``, ``.{name}.ptv2-old-*``) are ever deleted, and only while
  holding the folder's lock (``flock`` on ``.{name}.ptv2-lock``), so they cannot belong to a save in progress.
- ``keep_old_entries``: whatever the old folder holds that the new content does not replace (a tokenizer, a Trainer
  checkpoint's optimizer state, a user's notes) is carried into the new folder as hard links (copies where links are
  impossible), so the swap does not drop it.
- A mount point cannot be swapped (its sibling lives on another file system): ``unswappable_reason`` says so before
  anything is written.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; there, one writer per folder at a time is the caller's business
    fcntl = None

TAG = "ptv2"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# errno values meaning "this system or file system cannot exchange": fall back to rename aside + rename in
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


class NotSwappableError(OSError):
    """The destination cannot be replaced by a swap (e.g. it is a mount point)."""


def _load_renameat2() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def exchange(first: str | os.PathLike, second: str | os.PathLike) -> None:
    """Swap two existing paths atomically (``renameat2(RENAME_EXCHANGE)``); OSError where unsupported."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available on this system")
    if _renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(first), None, str(second))


def unswappable_reason(destination: str | os.PathLike) -> str | None:
    """Why ``destination`` cannot be replaced by a swap, or None if it can."""
    path = os.path.realpath(destination)
    if os.path.ismount(path):
        return f"{path} is a mount point, which cannot be swapped with a sibling folder"
    return None


@contextmanager
def replace_folder(
    destination: str | os.PathLike,
    *,
    keep_old_entries: bool = False,
    copy_first: Collection[str] = (),
    group: Collection[str] = (),
    before_swap: Callable[[], None] | None = None,
) -> Iterator[Path]:
    """Yield an empty staging folder beside ``destination``; when the block succeeds, swap it in whole.

    ``copy_first``: top-level files of the old folder copied (not linked) into staging before the block runs, for
    writers that update a file rather than replace it. ``keep_old_entries``: carry over what the new content does
    not replace; ``group`` names files that belong together, so in a folder where the new content has one of them,
    the old folder's others are dropped, not carried (an old ``adapter_model.bin`` must not sit beside a new
    config). ``before_swap`` runs under the lock right before the swap and may refuse it by raising. If the block
    or anything before the swap fails, the staging folder is deleted and the destination is untouched.
    """
    destination = Path(os.path.realpath(destination))
    reason = unswappable_reason(destination)
    if reason is not None:
        raise NotSwappableError(errno.EXDEV, reason)
    if os.path.lexists(destination) and not destination.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(destination))
    destination.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(destination):
        recover(destination)
        staging = _sibling(destination, "new")
        os.mkdir(staging)
        try:
            for name in copy_first:
                if (destination / name).is_file() and not (destination / name).is_symlink():
                    shutil.copy2(destination / name, staging / name)
            yield staging
            if before_swap is not None:
                before_swap()
            carried = _carry_over(destination, staging, group) if keep_old_entries else []
            if destination.is_dir():
                shutil.copymode(destination, staging)
            _sync_tree(staging, carried)
            cwd = _cwd_inside(destination)
            old = _swap(staging, destination)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_folder(destination.parent)
        if cwd is not None:  # our working directory was the old folder: enter the new one
            os.chdir(cwd if os.path.isdir(cwd) else destination)
        if old is not None:
            if keep_old_entries:  # entries another process created during the save
                _carry_over(old, destination, group, move=True)
            shutil.rmtree(old, ignore_errors=True)


def recover(destination: str | os.PathLike) -> None:
    """Clean up after saves killed mid-way: put back an old folder left aside, delete staging folders.

    Call only while holding the folder's lock (``replace_folder`` does), so no save in progress is touched.
    """
    destination = Path(destination)
    pattern = re.compile(rf"\.{re.escape(destination.name)}\.{TAG}-(new|old)-[0-9a-f]{{12}}")
    leftovers = [(m[1], entry.path) for entry in os.scandir(destination.parent)
                 if (m := pattern.fullmatch(entry.name)) and entry.is_dir(follow_symlinks=False)]
    for kind, path in sorted(leftovers):  # "new" before "old": harmless either way, but deterministic
        if kind == "old" and not os.path.lexists(destination):
            os.rename(path, destination)  # killed between "rename aside" and "rename in": the old folder is whole
        else:
            shutil.rmtree(path, ignore_errors=True)


def _sibling(destination: Path, kind: str) -> Path:
    return destination.parent / f".{destination.name}.{TAG}-{kind}-{uuid.uuid4().hex[:12]}"


@contextmanager
def _writer_lock(destination: Path) -> Iterator[None]:
    """One writer per folder: an exclusive flock on a sibling lock file, removed when the save ends."""
    if fcntl is None:
        yield
        return
    path = destination.parent / f".{destination.name}.{TAG}-lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break  # else the previous holder removed the file while we waited: lock the new one
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


def _swap(staging: Path, destination: Path) -> Path | None:
    """Put ``staging`` at ``destination``; returns where the old content went (None if there was none)."""
    if not os.path.lexists(destination):
        os.rename(staging, destination)
        return None
    try:
        exchange(staging, destination)
        return staging
    except OSError as error:
        if error.errno not in _NO_EXCHANGE:
            raise
    aside = _sibling(destination, "old")
    os.rename(destination, aside)
    try:
        os.rename(staging, destination)
    except BaseException:
        os.rename(aside, destination)
        raise
    return aside


def _carry_over(old: Path, new: Path, group: Collection[str], *, move: bool = False) -> list[Path]:
    """Bring entries of ``old`` that ``new`` lacks into ``new`` (hard links, or renames with ``move``)."""
    carried: list[Path] = []
    if not old.is_dir():
        return carried
    present = set(os.listdir(new))
    dropped = set(group) if present & set(group) else set()
    for entry in os.scandir(old):
        target = new / entry.name
        if entry.name in dropped:
            continue
        if entry.name in present:
            if entry.is_dir(follow_symlinks=False) and target.is_dir() and not target.is_symlink():
                carried.extend(_carry_over(Path(entry.path), target, group, move=move))
            continue
        if move:
            os.rename(entry.path, target)
        elif entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        else:
            _link_or_copy(entry.path, target)
        carried.append(target)
    return carried


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        if not stat.S_ISREG(os.lstat(source).st_mode):
            raise
        shutil.copy2(source, target)


def _sync_tree(root: Path, carried: list[Path]) -> None:
    """fsync every file written into ``root`` (carried files are old, already on disk) and every folder."""
    skip = {str(path) for path in carried}
    for folder, _, files in os.walk(root):
        inside_carried = folder in skip or any(folder.startswith(s + os.sep) for s in skip)
        for name in files:
            path = os.path.join(folder, name)
            if not inside_carried and path not in skip and not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_folder(folder)


def _fsync_folder(path: str | os.PathLike) -> None:
    """Make a folder's entries durable where the platform allows it (not on Windows, not on every file system)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cwd_inside(destination: Path) -> str | None:
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        return None
    inside = cwd == str(destination) or cwd.startswith(str(destination) + os.sep)
    return cwd if inside else None
