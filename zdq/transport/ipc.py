"""ipc:// between the processes of one host: a broker's second listener, and how a peer finds it.

A broker binds TCP on its worker's host (:mod:`zdq.transport.addresses`); it also binds a Unix
socket (``ipc://``) in a private directory of the user that runs it, and a driver or consumer of
the same host connects there instead of to the TCP port: a round trip over a Unix socket skips the
TCP stack (a bare ZeroMQ echo between two processes: about 83 µs against 117 µs over loopback TCP).
CurveZMQ runs over ipc as over TCP (the keys are the socket's; the transport does not change them).

Nothing new is advertised: the ipc path is a function of the broker's TCP endpoint and of the
network namespace it is bound in (:func:`ipc_path`). In one network namespace a TCP endpoint names
one listening socket, so a peer that computes the same path for the same endpoint, finds a Unix
socket there and can connect to it (:func:`ipc_endpoint`), reaches the broker that bound that
endpoint. Anything else falls back to TCP: another host or namespace (no file), a file left by a
broker that was killed (nothing listens: the probe's connect is refused), a socket whose accept
queue is full (harmless: that peer goes over TCP), a directory that is not private or not given as
an absolute path, a path too long for a Unix socket, a platform without them.

The directory (``zdq-<uid>`` under ``$ZDQ_IPC_DIR``, else ``$XDG_RUNTIME_DIR``, else the temporary
directory) is made with mode 0700 and used only if it is a directory owned by this user that no one
else may enter: another local user cannot connect to the sockets in it. A broker removes its file
when it stops (:meth:`IpcBinding.remove`); one killed leaves it behind, for the first broker that a
process of the host starts later to remove once it is a minute old and refuses connections
(:func:`sweep`), or for the next broker bound to the same endpoint to take over.

A file's name starts with the id of the kernel that bound it (its boot id, else the host name:
:func:`_kernel_id`), and a sweep removes only files of its own kernel: a directory shared between
hosts (``$ZDQ_IPC_DIR`` on NFS) holds sockets of other kernels, which refuse this one's connections
although their brokers live.
"""

from __future__ import annotations

import atexit
import errno
import functools
import hashlib
import logging
import os
import socket
import stat
import tempfile
import time
from typing import Any

import zmq

__all__ = ["IpcBinding", "ipc_dir", "ipc_endpoint", "ipc_path", "serve_on_ipc", "sweep"]

logger = logging.getLogger(__name__)

#: sockaddr_un's sun_path holds 108 bytes on Linux (104 on the BSDs), the final NUL included.
_MAX_PATH = 100
#: A socket file older than this that refuses connections was left by a killed broker (seconds).
_SWEEP_AGE = 60.0
#: At most this many old files are probed by a sweep (a connection each).
_SWEEP_PROBES = 64
_swept_by = 0  # the process that swept (a forked child sweeps again)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _info_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.info(message)


def ipc_dir(*, create: bool) -> str | None:
    """This user's private directory for zdq's Unix sockets, or None where ipc is not usable
    (no Unix sockets, a relative base, or the directory is not this user's alone). ``create``:
    make it if missing (a broker does; a peer only looks)."""
    if os.name != "posix" or not hasattr(socket, "AF_UNIX"):
        return None
    base = os.environ.get("ZDQ_IPC_DIR") or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    if not os.path.isabs(base):
        # libzmq reads ipc://@name as a Linux abstract socket, which no file permission guards.
        _warn_once(
            f"zdq: the directory for brokers' ipc sockets must be an absolute path, not {base!r} (from "
            "ZDQ_IPC_DIR or XDG_RUNTIME_DIR): brokers of this host are reached over TCP only"
        )
        return None
    path = os.path.join(base, f"zdq-{os.getuid()}")
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            _warn_once(f"zdq: cannot make the directory {path} for brokers' ipc sockets ({e}): brokers serve TCP only")
            return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        _warn_once(
            f"zdq: {path} is {_found(st)}, where a private directory of this user is required (a directory, "
            f"not a symlink, owned by uid {os.getuid()}, mode 0700): it is not used for ipc sockets, and "
            "brokers of this host are reached over TCP. Remove it, or set ZDQ_IPC_DIR to a directory of your own."
        )
        return None
    return path


def _found(st: os.stat_result) -> str:
    """What a path holds, for a warning: its kind, mode and owner."""
    mode = st.st_mode
    kinds = (
        (stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a file"), (stat.S_ISSOCK, "a socket")
    )
    kind = next((name for test, name in kinds if test(mode)), "a special file")
    return f"{kind} of mode {stat.S_IMODE(mode):04o} owned by uid {st.st_uid}"


def _network_namespace() -> str:
    """This process's network namespace (on Linux), in which a TCP endpoint names one socket."""
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return ""


@functools.cache
def _kernel_id() -> str:
    """This kernel's id: its boot id (Linux; containers of one host share it, as they can share
    Unix sockets), else the host name. Named in each file, so that a sweep leaves the sockets of
    other hosts alone in a directory they share."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            seed = f.read().strip()
    except OSError:
        seed = socket.gethostname().encode()
    return hashlib.sha1(seed).hexdigest()[:8]


def _prefix() -> str:
    """The start of the names of this kernel's socket files (the only ones a sweep may remove)."""
    return f"b-{_kernel_id()}"


def ipc_path(directory: str, endpoint: str) -> str | None:
    """Where the broker bound at TCP ``endpoint`` (in this kernel and network namespace) binds its
    Unix socket, or None if the path would be too long for one (said once, at info: TCP is used)."""
    key = hashlib.sha1(f"{_network_namespace()} {endpoint}".encode()).hexdigest()[:16]  # 26 characters in all
    path = os.path.join(directory, f"{_prefix()}{key}")
    if len(path.encode()) > _MAX_PATH:
        _info_once(
            f"zdq: {path} is longer than a Unix socket's path may be ({_MAX_PATH} bytes): brokers of this host "
            "are reached over TCP; set ZDQ_IPC_DIR to a shorter directory for ipc"
        )
        return None
    return path


def _connect_probe(path: str) -> int:
    """Connect to the Unix socket at ``path`` and hang up: 0 if it accepted, else the errno.
    ECONNREFUSED: nothing listens (a killed broker's file, or a socket of another kernel). EAGAIN:
    it listens but its accept queue is full (the probe does not wait: the socket is non-blocking)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except TimeoutError:
        return errno.ETIMEDOUT
    except OSError as e:
        return e.errno or errno.EIO
    finally:
        probe.close()
    return 0


def _listening(path: str) -> bool:
    """Whether a Unix socket at ``path`` accepts a connection now. False for a full accept queue
    too: a peer then goes over TCP, which is harmless (:func:`sweep` keeps such a file)."""
    return _connect_probe(path) == 0


def _dead(path: str) -> bool:
    """Whether nobody listens on the Unix socket at ``path`` (refused); busy or slow is alive."""
    return _connect_probe(path) == errno.ECONNREFUSED


def ipc_endpoint(endpoint: str) -> str | None:
    """``ipc://...`` of the broker at TCP ``endpoint`` if it is on this host and listening there
    (see the module); None: connect over TCP."""
    if not endpoint.startswith("tcp://"):
        return None
    directory = ipc_dir(create=False)
    if directory is None:
        return None
    path = ipc_path(directory, endpoint)
    if path is None:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    # A full accept queue (EAGAIN) counts as not listening here: this peer then connects over TCP,
    # which is harmless (the broker serves both); only the sweep must tell it from a dead socket.
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid() or not _listening(path):
        return None
    return f"ipc://{path}"


class IpcBinding:
    """A broker's Unix socket file; :meth:`remove` deletes it if it is still the one bound. The
    files of brokers still serving when the interpreter exits (a worker closed without stopping its
    actors) are removed then (:func:`_remove_at_exit`); only a killed process leaves its files."""

    __slots__ = ("_inode", "_pid", "path")

    def __init__(self, path: str, inode: int) -> None:
        self.path = path
        self._inode = inode
        self._pid = os.getpid()
        _serving.add(self)

    def remove(self) -> None:
        """Delete the file, unless another broker took the path over since. Idempotent."""
        _serving.discard(self)
        try:
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass  # gone already


_serving: set[IpcBinding] = set()  # this process's bound files (a set: add and discard are atomic)


@atexit.register
def _remove_at_exit() -> None:
    for binding in list(_serving):
        if binding._pid == os.getpid():  # a forked child leaves its parent's files alone
            binding.remove()


def sweep(directory: str, now: float | None = None, limit: int = _SWEEP_PROBES) -> int:
    """Remove the files of brokers that were killed: sockets of this user and kernel in the private
    ``directory`` (:func:`ipc_dir`) that refuse connections, older than :data:`_SWEEP_AGE` (one
    just bound may not listen yet), probing at most ``limit`` of them, oldest first (a host of many
    brokers is not probed whole at each start). A socket that is busy (accept queue full) or slow
    to answer is kept. Returns how many went."""
    now = time.time() if now is None else now
    old: list[tuple[float, str, int]] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    prefix, uid = _prefix(), os.getuid()
    for name in names:
        if not name.startswith(prefix):
            continue  # another kernel's (a directory shared between hosts), or not zdq's
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue  # gone meanwhile
        if stat.S_ISSOCK(st.st_mode) and st.st_uid == uid and now - st.st_mtime > _SWEEP_AGE:
            old.append((st.st_mtime, path, st.st_ino))
    removed = 0
    for _, path, inode in sorted(old)[:limit]:
        if _dead(path):
            try:
                if os.lstat(path).st_ino == inode:  # not taken over by a broker meanwhile
                    os.unlink(path)
                    removed += 1
            except OSError:
                pass  # gone meanwhile
    return removed


def _sweep_once(directory: str) -> None:
    """:func:`sweep` for the first broker a process starts (later ones find it done)."""
    global _swept_by
    if _swept_by != os.getpid():
        _swept_by = os.getpid()
        sweep(directory)


def serve_on_ipc(sock: zmq.Socket[Any], endpoint: str) -> IpcBinding | None:
    """Bind broker socket ``sock`` (bound at TCP ``endpoint``) on its Unix socket too; None if
    ipc is not usable here (then peers of this host connect over TCP, as others do). Files left
    by killed brokers are swept first."""
    directory = ipc_dir(create=True)
    path = ipc_path(directory, endpoint) if directory is not None else None
    if directory is None or path is None:
        return None
    _sweep_once(directory)
    try:
        os.unlink(path)  # left by a killed broker bound to the same endpoint before
    except FileNotFoundError:
        pass
    except OSError as e:
        _warn_once(f"zdq: cannot replace {path} ({e}): this host's peers reach its broker over TCP")
        return None
    address = f"ipc://{path}"
    try:
        sock.bind(address)
    except zmq.ZMQError as e:
        _warn_once(f"zdq: cannot bind a broker's ipc socket at {path} ({e}): this host's peers reach it over TCP")
        return None
    try:
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
            raise OSError(f"{path} is {_found(st)}, not a socket of uid {os.getuid()}")
    except OSError as e:
        _unbind(sock, address)  # the warning says TCP only: no ipc listener may stay behind it
        _warn_once(f"zdq: a broker's ipc socket at {path} is not usable ({e}): this host's peers reach it over TCP")
        return None
    return IpcBinding(path, st.st_ino)


def _unbind(sock: zmq.Socket[Any], address: str) -> None:
    try:
        sock.unbind(address)
    except zmq.ZMQError as e:
        logger.warning("zdq: cannot unbind %s (%s)", address, e)
