"""Output staging: build DST in a folder beside it, publish it in one step, never lose the old one.

``with Staging(dst, overwrite=...) as st: <write into st.path>; st.publish()``

- DST is resolved first (``.`` and relative paths work); DST equal to or inside SRC is refused.
- The work folder is ``.<name>.streamfold-partial`` beside DST (same filesystem, so publishing is a
  rename), a fixed name a later run can find. Beside it, ``.<name>.streamfold-lock`` holds JSON
  (pid, host, start time, argv, phase) and an ``fcntl.flock`` for the life of the Staging. The lock is
  not inside the work folder because that folder becomes DST. The kernel drops a flock when its owner
  dies however it dies, and pid reuse cannot fake one, so "the flock can be taken" is the proof that
  a left-over work folder's owner is dead: only then is it removed (or, with ``adopt``, kept for a
  resume), with one line through ``log``. A live owner is refused with one line naming its pid.
- Folders are created by ``os.mkdir`` and files by ``open``, so modes follow the umask as ``mkdir`` and
  ``cp`` give them (0777 / 0666 minus the umask); nothing copies a source file's mode.
- ``publish`` on Linux is ``renameat2``: ``RENAME_EXCHANGE`` swaps the finished folder with an existing
  DST (an empty one too) in one step, after which the old tree sits at the work path and is removed
  (a kill during that removal leaves it for the next run to reclaim); ``RENAME_NOREPLACE`` moves it
  into place when DST does not exist. At every instant DST is the complete old or the complete new
  checkpoint. Fallback, where ``renameat2`` is missing or the filesystem refuses it: DST is renamed to
  ``.<name>.streamfold-old`` (a fixed name, recorded in the lock's phase), the new folder renamed into
  place, the old one removed. A kill between those two renames leaves no DST for that moment, but the
  old checkpoint intact under the fixed name: the next run for DST renames it back (and says so).
  Publishing is rename-atomic against process kills; it does not fsync (a power loss can still lose
  recently written data, as with any unsynced write).
- Python raises :class:`Terminated` on SIGTERM once :func:`handle_sigterm` is installed (the CLI does);
  like ``KeyboardInterrupt`` it unwinds through the Staging, which removes the work folder. SIGKILL
  leaves the work folder and the lock file; the next run reclaims them.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from ..core.errors import StreamfoldError

PARTIAL_SUFFIX = ".streamfold-partial"
LOCK_SUFFIX = ".streamfold-lock"
OLD_SUFFIX = ".streamfold-old"
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM (after :func:`handle_sigterm`); exit status 143."""


def handle_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated`, so cleanup runs as for Ctrl-C (main thread only)."""
    def raise_terminated(signum, frame):
        raise Terminated()
    signal.signal(signal.SIGTERM, raise_terminated)


def _default_log(line: str) -> None:
    logging.getLogger("streamfold").warning(line)


def check_destination(src: str | os.PathLike | None, dst: str | os.PathLike, overwrite: bool) -> Path:
    """The resolved DST; raises :class:`StreamfoldError` if it would clobber SRC or existing work."""
    try:
        return _check_destination(src, dst, overwrite)
    except OSError as e:  # e.g. a parent folder we may not enter
        raise StreamfoldError(f"{e.filename or dst}: cannot check the destination ({e.strerror or e})") from None


def _check_destination(src, dst, overwrite: bool) -> Path:
    d = Path(dst).resolve()
    if d.parent == d:
        raise StreamfoldError(f"{dst}: the root folder cannot be a destination; choose another folder")
    s = Path(src).resolve() if src is not None else None
    if s is not None and (d == s or s in d.parents):
        raise StreamfoldError(f"{dst}: destination is the source or inside it; choose another folder")
    if d.exists():
        if not d.is_dir():
            raise StreamfoldError(f"{dst}: exists and is not a folder; choose another destination")
        try:
            nonempty = any(d.iterdir())
        except OSError as e:
            raise StreamfoldError(f"{dst}: cannot read the destination ({e.strerror or e})") from None
        if nonempty:
            if not overwrite:
                raise StreamfoldError(f"{dst}: exists and is not empty; pass --overwrite to replace it")
            if s is not None and d in s.parents:
                raise StreamfoldError(f"{dst}: contains the source; refusing to overwrite it")
    return d


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """``renameat2(a, b, flags)``; False when the C library or the filesystem does not support it."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


_LIBC = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:  # pragma: no cover - no C library to load
            _LIBC.append(None)
    return _LIBC[0]


def remove_tree(path: Path) -> None:
    """Remove a folder (or file) that may be partly gone already."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


class Staging:
    """A work folder beside ``dst``, locked for this process, published atomically. See the module doc.

    ``log`` gets the one-line notes (a reclaimed or restored folder); default: the ``streamfold``
    logger. ``adopt(path, owner)`` is asked about a work folder left by a dead owner (``owner``: its
    lock record, or None) that was still being written: True keeps it as ``st.path`` (``st.adopted``)
    for a resume; the default removes it.
    """

    def __init__(self, dst: str | os.PathLike, *, overwrite: bool = False, src: str | os.PathLike | None = None,
                 log: Callable[[str], None] | None = None,
                 adopt: Callable[[Path, dict | None], bool] | None = None) -> None:
        self.given = os.fspath(dst)
        self.overwrite, self.src = overwrite, src
        self.log = log or _default_log
        self.adopt = adopt
        self.adopted = False
        self.published = False
        self._fd: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> "Staging":
        self.dst = check_destination(self.src, self.given, self.overwrite)
        parent, name = self.dst.parent, self.dst.name
        self.path = parent / f".{name}{PARTIAL_SUFFIX}"
        self.lock_path = parent / f".{name}{LOCK_SUFFIX}"
        self.old_path = parent / f".{name}{OLD_SUFFIX}"
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StreamfoldError(f"{e.filename or parent}: cannot create the output folder's parent "
                                  f"({e.strerror or e})") from None
        previous = self._lock()
        try:
            self._recover(previous)
            if not self.adopted:
                self.path.mkdir()
        except BaseException as e:
            self._unlock()
            if isinstance(e, OSError):
                raise StreamfoldError(f"{e.filename or self.path}: cannot create the output folder "
                                      f"({e.strerror or e})") from None
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def close(self) -> None:
        """Remove the work folder unless published, and release the lock (signals held meanwhile)."""
        if self._fd is None:
            return
        blocked = _block_signals()
        try:
            if not self.published:
                remove_tree(self.path)
            self._unlock()
        finally:
            _unblock_signals(blocked)

    # -- publishing ---------------------------------------------------------------------------------
    def publish(self) -> None:
        """Make the work folder DST in one step; an old DST is removed only after it is replaced."""
        dst = self.dst
        if os.path.lexists(dst) and not self.overwrite:
            check_destination(None, dst, overwrite=False)  # appeared meanwhile: refuse unless empty
        self._phase("publishing")
        try:
            if os.path.lexists(dst):
                here = _cwd() == dst
                if _renameat2(self.path, dst, _RENAME_EXCHANGE):
                    self.published = True
                    self._phase("removing old")
                    remove_tree(self.path)  # the old tree, now at the work path
                else:
                    self._publish_fallback()
                if here:  # our cwd was the old folder: follow DST (a shell there needs `cd .`)
                    os.chdir(dst)
                    self.log(f"streamfold: {self.given} was the current folder and is now a new folder; "
                             "run `cd .` to see it")
            elif _renameat2(self.path, dst, _RENAME_NOREPLACE):
                self.published = True
            else:
                os.rename(self.path, dst)
                self.published = True
        except OSError as e:
            if e.errno == errno.EEXIST or e.errno == errno.ENOTEMPTY:
                raise StreamfoldError(f"{self.given}: appeared while converting; not replaced (run again with "
                                      "--overwrite to replace it)") from None
            raise StreamfoldError(f"{e.filename or dst}: cannot move the finished output into place "
                                  f"({e.strerror or e})") from None

    def _publish_fallback(self) -> None:
        """Two renames through the fixed ``.old`` name (see the module doc); the next run recovers."""
        os.rename(self.dst, self.old_path)
        try:
            os.rename(self.path, self.dst)
        except BaseException:
            os.rename(self.old_path, self.dst)
            raise
        self.published = True
        self._phase("removing old")
        remove_tree(self.old_path)

    # -- the lock -----------------------------------------------------------------------------------
    def _lock(self) -> dict | None:
        """Take the flock (retrying if the file is replaced under us); returns the previous record."""
        for attempt in range(5):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as e:
                raise StreamfoldError(f"{self.dst.parent}: cannot write the output there ({e.strerror or e}; "
                                      f"creating {self.lock_path.name})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner, st = _read_record(fd), os.fstat(fd)
                os.close(fd)
                if _is(self.lock_path, st) and (owner or attempt >= 2):
                    pid = (owner or {}).get("pid", "?")
                    raise StreamfoldError(f"{self.given}: another streamfold (pid {pid}) is writing it "
                                          f"(lock {self.lock_path})") from None
                time.sleep(0.05)  # replaced under us, or its owner has not written its record yet
                continue
            if not _is(self.lock_path, os.fstat(fd)):  # unlinked by its last owner after we opened it
                os.close(fd)
                continue
            previous = _read_record(fd)
            self._fd = fd
            self._phase("writing")
            return previous
        raise StreamfoldError(f"{self.lock_path}: could not take the output lock (it keeps changing)")

    def _phase(self, phase: str) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": getattr(self, "_started", None)
                  or time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "dst": str(self.dst),
                  "phase": phase}
        self._started = record["started"]
        raw = (json.dumps(record) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, raw, 0)

    def _unlock(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.lock_path)  # while still holding it: a waiter then sees a replaced file
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def _recover(self, previous: dict | None) -> None:
        """Deal with what a dead owner left: a half-done fallback publish, a work folder."""
        who = (f"pid {previous.get('pid', '?')}, started {previous.get('started', '?')}" if previous
               else "owner unknown")
        if os.path.lexists(self.old_path):
            if os.path.lexists(self.dst):
                remove_tree(self.old_path)
                self.log(f"streamfold: removed {self.old_path}, the old checkpoint a killed --overwrite "
                         f"({who}) had already replaced")
            else:
                os.rename(self.old_path, self.dst)
                self.log(f"streamfold: restored {self.dst} from {self.old_path}, left by a killed --overwrite "
                         f"({who})")
        if os.path.lexists(self.path):
            writing = previous is not None and previous.get("phase") == "writing"
            if writing and self.adopt is not None and self.path.is_dir() and self.adopt(self.path, previous):
                self.adopted = True
                return
            remove_tree(self.path)
            what = {"removing old": "the replaced checkpoint a killed --overwrite was removing",
                    "publishing": "left by a run killed while publishing"}.get(
                (previous or {}).get("phase"), "partial output of a killed run")
            self.log(f"streamfold: removed {self.path}, {what} ({who})")


def _cwd() -> Path | None:
    try:
        return Path.cwd().resolve()
    except OSError:
        return None


def _read_record(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        rec = json.loads(raw.decode("utf-8")) if raw.strip() else None
        return rec if isinstance(rec, dict) else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _is(path: Path, st: os.stat_result) -> bool:
    """Whether ``path`` still names the file ``st`` describes."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


def _block_signals():
    try:
        return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None


def _unblock_signals(previous) -> None:
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
