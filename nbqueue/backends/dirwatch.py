"""Waking when names appear in a directory: fq://'s idle workers (new tasks in ``queue/``) and
waiters (new records in ``done/<job>/``) block on this instead of sleeping on a timer.

On Linux with the queue on a local file system, ``inotify`` wakes the waiter as the name is
linked. A shared file system (NFS, CIFS, FUSE mounts, Lustre, ...) never tells one machine about
another machine's writes, so there, and where inotify is missing, a watch falls back to a short
adaptive poll: it answers "maybe" every few milliseconds at first, backing off to
``POLL_MAX_SECONDS`` while nothing changes, and callers re-read what they wait for.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import select
import struct
import threading
import time

from .. import defaults

#: inotify events that mean "a name appeared": a link or create, or a rename into the directory.
_IN_CREATE, _IN_MOVED_TO = 0x100, 0x80
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, 0o2000000
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)
#: File systems whose changes the local kernel sees, all of them: inotify is trusted only there.
LOCAL_FILE_SYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "overlay", "zfs", "f2fs", "jfs", "bcachefs"}
)
#: The fallback poll: first pause, and the longest one while nothing changes.
POLL_MIN_SECONDS, POLL_MAX_SECONDS = 0.002, 0.05


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.inotify_init1  # noqa: B018 - present only on Linux
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def file_system_type(path: str) -> str | None:
    """The type of the file system ``path`` is on (``ext4``, ``nfs4``, ...), from the kernel's
    mount table; None where there is none to read (not Linux)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return None
    path = os.path.realpath(path)
    best, best_type = "", None
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = fields[4].replace("\\040", " ")
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, line.split(" - ", 1)[1].split()[0]
    return best_type


def notifications_work(path: str) -> bool:
    """Whether inotify sees every change to ``path``: Linux, a local file system, and not turned
    off by ``$NBQUEUE_FQ_POLL`` (set it for a directory shared through a mount this does not
    know to be shared)."""
    if os.environ.get(defaults.ENV_FQ_POLL) or _libc() is None:
        return False
    return file_system_type(path) in LOCAL_FILE_SYSTEMS


class DirectoryWatch:
    """Wait for names to appear in one directory (which must exist)."""

    def __init__(self, path: str, notify: bool) -> None:
        """Args:
        path: the directory.
        notify: use inotify (``notifications_work(path)`` said it is trustworthy), else poll.
        """
        self.path = path
        self._fd = self._wd = -1
        self._pause = POLL_MIN_SECONDS
        self._stamp = self._change_stamp()
        if notify:
            self._fd, self._wd = _borrow(path)

    @property
    def notified(self) -> bool:
        """True when the kernel wakes this watch (inotify), False when it polls."""
        return self._fd >= 0

    def _change_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_nlink

    def wait(self, timeout: float) -> bool:
        """Block until a name appeared since the last call returned True (or the watch began),
        or ``timeout`` passed. True if one did, or may have (the poll)."""
        if self._fd < 0:
            return self._poll(timeout)
        end = time.monotonic() + max(timeout, 0.0)
        while True:
            readable, _, _ = select.select([self._fd], [], [], max(end - time.monotonic(), 0.0))
            if not readable:
                return False
            if self._wd in _watch_descriptors(self._fd):
                return True
            # Only events of a watch this descriptor held before (it is pooled): wait on.

    def _poll(self, timeout: float) -> bool:
        # The directory's change time moves when a name is added here, but a shared file system
        # may cache it for seconds: a pause passed answers "maybe" all the same.
        time.sleep(max(min(self._pause, timeout), 0.0))
        stamp = self._change_stamp()
        if stamp != self._stamp:
            self._stamp, self._pause = stamp, POLL_MIN_SECONDS
        else:
            self._pause = min(self._pause * 2, POLL_MAX_SECONDS)
        return True

    def close(self) -> None:
        """Stop watching; the inotify descriptor goes back to the pool."""
        if self._fd >= 0:
            _give_back(self._fd, self._wd)
            self._fd = self._wd = -1

    def __del__(self) -> None:
        self.close()


# inotify descriptors are pooled per process, never closed: closing one costs the kernel several
# milliseconds (it waits for an RCU grace period) on every wait, while moving a watch from one
# directory to another (add_watch, rm_watch) costs microseconds.
_pool: list[int] = []
_pool_lock = threading.Lock()
_pool_pid = os.getpid()  # a forked child shares its parent's descriptors: it starts a pool of its own


def _borrow(path: str) -> tuple[int, int]:
    """An inotify descriptor watching ``path`` for new names, and the watch's id; (-1, -1) when
    there is none to be had (no inotify, the directory vanished, the watch limit reached)."""
    libc = _libc()
    if libc is None:
        return -1, -1
    global _pool_pid
    with _pool_lock:
        if _pool_pid != os.getpid():
            _pool.clear()
            _pool_pid = os.getpid()
        fd = _pool.pop() if _pool else libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        return -1, -1
    _watch_descriptors(fd)  # what an earlier watch left behind
    wd = libc.inotify_add_watch(fd, os.fsencode(path), _IN_CREATE | _IN_MOVED_TO)
    if wd < 0:
        with _pool_lock:
            _pool.append(fd)
        return -1, -1
    return fd, wd


def _give_back(fd: int, wd: int) -> None:
    libc = _libc()
    assert libc is not None, "a descriptor was borrowed"
    libc.inotify_rm_watch(fd, wd)
    _watch_descriptors(fd)
    with _pool_lock:
        if _pool_pid == os.getpid():  # borrowed before a fork: the parent's to keep
            _pool.append(fd)


def _watch_descriptors(fd: int) -> set[int]:
    """Read every pending event of ``fd`` (it does not block); the watch ids they are for."""
    seen: set[int] = set()
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return seen
        if not data:
            return seen
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
            seen.add(wd)
            offset += _EVENT.size + length
