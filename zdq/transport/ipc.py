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
broker that was killed (nothing listens: the probe's connect is refused), a directory that is not
private, a path too long for a Unix socket, a platform without them.

The directory (``zdq-<uid>`` under ``$ZDQ_IPC_DIR``, else ``$XDG_RUNTIME_DIR``, else the temporary
directory) is made with mode 0700 and used only if it is a directory owned by this user that no one
else may enter: another local user cannot connect to the sockets in it. A broker removes its file
when it stops (:meth:`IpcBinding.remove`); one killed leaves it behind, for the first broker that a
process of the host starts later to remove once it is a minute old (:func:`sweep`), or for the next
broker bound to the same endpoint to take over.
"""

from __future__ import annotations

import atexit
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


def ipc_dir(*, create: bool) -> str | None:
    """This user's private directory for zdq's Unix sockets, or None where ipc is not usable
    (no Unix sockets, or the directory is not this user's alone). ``create``: make it if missing
    (a broker does; a peer only looks)."""
    if os.name != "posix" or not hasattr(socket, "AF_UNIX"):
        return None
    base = os.environ.get("ZDQ_IPC_DIR") or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
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
            f"zdq: {path} is not a private directory of this user (mode 0700, owned by uid {os.getuid()}): "
            "it is not used for ipc sockets, and brokers of this host are reached over TCP. Remove it, or set "
            "ZDQ_IPC_DIR to a directory of your own."
        )
        return None
    return path


def _network_namespace() -> str:
    """This process's network namespace (on Linux), in which a TCP endpoint names one socket."""
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return ""


def ipc_path(directory: str, endpoint: str) -> str | None:
    """Where the broker bound at TCP ``endpoint`` (in this network namespace) binds its Unix
    socket, or None if the path would be too long for one."""
    key = hashlib.sha1(f"{_network_namespace()} {endpoint}".encode()).hexdigest()[:24]
    path = os.path.join(directory, f"b-{key}")
    return path if len(path.encode()) <= _MAX_PATH else None


def _listening(path: str) -> bool:
    """Whether a Unix socket at ``path`` accepts connections (a file left by a killed broker does not)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


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
    """Remove the files of brokers that were killed (sockets that refuse connections, older than
    :data:`_SWEEP_AGE`: one just bound may not listen yet), probing at most ``limit`` of them,
    oldest first (a host of many brokers is not probed whole at each start). Returns how many went."""
    now = time.time() if now is None else now
    old: list[tuple[float, str]] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue  # gone meanwhile
        if stat.S_ISSOCK(st.st_mode) and now - st.st_mtime > _SWEEP_AGE:
            old.append((st.st_mtime, path))
    removed = 0
    for _, path in sorted(old)[:limit]:
        if not _listening(path):
            try:
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
        _sweep_once(directory)


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
    try:
        sock.bind(f"ipc://{path}")
        inode = os.lstat(path).st_ino
    except (zmq.ZMQError, OSError) as e:
        _warn_once(f"zdq: cannot bind a broker's ipc socket at {path} ({e}): this host's peers reach it over TCP")
        return None
    return IpcBinding(path, inode)
