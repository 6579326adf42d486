"""The Broker actor: places a :class:`~zdq.broker.core.BrokerCore` on a Dask worker.

Actor methods are control plane only: start, stop, statistics, dead letters, where the queue lives.
Tasks never pass through them.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from dataclasses import replace

from zdq._actor import liveness_probe, scheduler_address, tell_placed, worker_address
from zdq.broker.control import BrokerControl
from zdq.broker.core import BrokerCore
from zdq.config import PoolSettings, settings
from zdq.errors import ClosedError, PlacementError, QueueMissing, ZdqError
from zdq.names import pool_of_queue
from zdq.observe.feed import Source, add_source, remove_source
from zdq.stats import BrokerStats
from zdq.storage.base import DeadLetter, Storage
from zdq.storage.memory import MemoryStorage
from zdq.transport.addresses import bind_address
from zdq.transport.ipc import IpcBinding, serve_on_ipc
from zdq.transport.security import Admission, ServerKeys
from zdq.transport.sockets import (
    bind_router,
    close_socket,
    process_context,
    serve_locally,
    stop_serving_locally,
)

__all__ = ["Broker"]

logger = logging.getLogger(__name__)


def _naming_worker(error: Exception, what: str) -> Exception:
    """``error`` said with ``what`` (naming the broker and its worker) before it. A zdq error
    keeps its type (a locked or missing directory, a port range exhausted: the pool tells them
    apart); any other becomes a :class:`PlacementError`."""
    if isinstance(error, ZdqError):
        try:
            return type(error)(f"{what}: {error}")
        except Exception:  # noqa: BLE001 - an error made otherwise than from its message
            return error
    return PlacementError(f"{what}: {type(error).__name__}: {error}")


class Broker:
    """Dask actor that runs one queue on the worker it is placed on.

    Parameters
    ----------
    name : str
        Queue name, shown in reprs and statistics.
    settings : PoolSettings
        The pool's resolved settings.
    dirpath : str, optional
        Queue directory of a durable queue; ``None`` for a transient (in-memory) queue.
    keys : ServerKeys, optional
        The pool's CURVE server keys; ``None`` runs the socket unauthenticated.
    must_exist : bool
        Recovery of a durable queue: open the directory only if it already holds this queue;
        never create a new, empty one (it would not hold the chunks that were confirmed).
    open_with : tuple, optional
        ``(creator, proposed key, n_queues)``: :meth:`open` in the constructor, so that placing a
        pool costs one actor call per broker less; what it answers is told to the scheduler
        (:func:`zdq._actor.tell_placed`), where the pool reads all its brokers' at once. A broker
        that cannot open raises from the constructor, naming itself and its worker: the
        placement fails with it.
    """

    def __init__(
        self,
        name: str,
        settings: PoolSettings,
        dirpath: str | None = None,
        keys: ServerKeys | None = None,
        must_exist: bool = False,
        open_with: tuple[bytes, bytes | None, int] | None = None,
    ) -> None:
        self.name = name
        self._settings = settings
        self._dirpath = dirpath
        self._keys = keys
        self._must_exist = must_exist
        self._auth: Admission | None = None
        self._ipc: IpcBinding | None = None  # its Unix socket, for the peers of its host
        self._core: BrokerCore | None = None
        self._source: Source | None = None  # what the process's monitoring feed reports of it
        self.endpoint = ""
        self.host = ""
        if open_with is not None:
            self._open_placed(*open_with)

    def _open_placed(self, creator: bytes, proposed_key: bytes | None, n_queues: int) -> None:
        """:meth:`open`, in the constructor, told to the scheduler. Its payload key is not told
        (the events are any client's to read), only whether it is the one proposed; a durable
        queue that keeps another is asked by the pool. A zdq error (a locked or missing
        directory) keeps its type; any other is a :class:`PlacementError` naming the worker."""
        try:
            endpoint, host, queue_id, key, beyond = self.open(creator, proposed_key, n_queues)
        except Exception as e:
            self.stop(discard=True)  # what it opened before it failed: no actor will own it
            raise _naming_worker(e, f"broker {self.name} on {worker_address() or 'this process'} could not open") from e
        tell_placed([endpoint, host, queue_id, key == proposed_key, beyond])

    def start(self, creator: bytes = b"") -> str:
        """Open storage, bind on this worker's host and start the loop; return the endpoint.

        ``creator`` is the identity of the driver of the pool that placed this broker.
        """
        if self._core is not None:
            return self.endpoint
        address = worker_address()
        # Where to bind: the pool's settings, else this worker's own configuration (a bind-host
        # or a port range set for the machine it runs on).
        here = settings()
        self.host = bind_address(
            address,
            scheduler_address(),
            bind_host=self._settings.bind_host or here.bind_host,
            default=self._settings.default_host,
        )
        storage = self._open_storage(address)
        ctx = process_context()
        try:
            sock, self.endpoint, self._auth = bind_router(
                ctx,
                self.host,
                max_message_size=self._settings.max_message_size,
                keys=self._keys,
                ports=self._settings.ports or here.ports,
            )
        except Exception:
            storage.discard()  # it never served: a queue it created is not left behind
            raise
        try:
            serve_locally(sock, self.endpoint)
            self._ipc = serve_on_ipc(sock, self.endpoint)
        except Exception:
            close_socket(sock)
            if self._auth is not None:
                self._auth.stop()
            storage.discard()
            raise
        self._core = BrokerCore(
            self.name, sock, storage, self._settings, liveness_probe(self), creator=creator, on_stop=self._release
        )
        self._core.start()
        core = self._core
        self._source = Source(
            "queue", pool_of_queue(self.name), self.name, self.statistics, lambda: core.running, host=self.host, owner=self
        )
        add_source(self._source)
        logger.info("broker %s serving on %s (pid %d)", self.name, self.endpoint, os.getpid())
        return self.endpoint

    def _open_storage(self, address: str | None) -> Storage:
        if self._dirpath is None:
            storage: Storage = MemoryStorage()
        else:
            from zdq.storage.lmdb import LMDBStorage, is_queue_dir

            if self._must_exist and not is_queue_dir(self._dirpath):
                raise QueueMissing(
                    f"durable queue {self.name}: its directory {self._dirpath} does not hold the queue on host "
                    f"{self.host} (worker {address}); it was not created anew, since an empty queue would not "
                    "hold the tasks that were confirmed. Bring back a worker on the host that has the directory."
                )
            storage = LMDBStorage(self._dirpath, map_size=self._settings.map_size, sync=self._settings.durable_sync)
        storage.open()
        return storage

    def stop(self, discard: bool = False) -> None:
        """Stop serving and release the socket and the storage. Idempotent. ``discard``: the
        pool's placement failed: a queue directory this broker created, and which holds
        nothing, is removed (a failed open leaves no queue behind to trouble the next one)."""
        if self._core is not None:
            self._core.stop(discard=discard)
        self._release()

    def _release(self) -> None:
        """Withdraw the inproc name, the ipc file and the ZAP domain (from the loop's thread when it stops by
        itself, or from stop()); idempotent."""
        source, self._source = self._source, None
        if source is not None:
            remove_source(source)
        if self.endpoint:
            stop_serving_locally(self.endpoint)
        ipc, self._ipc = self._ipc, None
        if ipc is not None:
            ipc.remove()
        if self._auth is not None:  # kept: its count of refused handshakes stays in the statistics
            self._auth.stop()

    def pid(self) -> int:
        return os.getpid()

    def loop_error(self) -> str:
        """Why the broker's loop ended on an error (it serves no one from then on: its pool
        places the queue again); "" while it runs, or if it was never started or stopped."""
        core = self._core
        return "" if core is None or core._error is None else f"its loop failed: {core._error!r}"

    def open(
        self, creator: bytes, proposed_key: bytes | None, n_queues: int = 0
    ) -> tuple[str, str, str, bytes | None, list[str]]:
        """:meth:`start`, :meth:`where` and :meth:`payload_key` in one call (placing a queue is
        one actor round trip, not three): ``(endpoint, host, queue id, payload key, beyond)``.

        ``beyond``: the directories of this pool's queues numbered ``n_queues`` or more beside this
        durable queue's own that hold tasks or schedules (a pool reopened with fewer queues would
        not serve them; an empty one is not worth a warning)."""
        endpoint = self.start(creator)
        host, queue_id = self.where()
        return endpoint, host, queue_id, self.payload_key(proposed_key), self._beyond(n_queues)

    def _beyond(self, n_queues: int) -> list[str]:
        if self._dirpath is None or n_queues <= 0:
            return []
        from zdq.storage.lmdb import holds_work

        parent = os.path.dirname(os.path.normpath(self._dirpath))
        pattern = re.compile(re.escape(pool_of_queue(self.name)) + r"-queue-(\d+)")
        try:
            names = os.listdir(parent)
        except OSError:
            return []
        return sorted(
            os.path.join(parent, name)
            for name in names
            if (m := pattern.fullmatch(name)) and int(m.group(1)) >= n_queues and holds_work(os.path.join(parent, name))
        )

    def where(self) -> tuple[str, str]:
        """``(host, queue id)``: where the queue lives, and the id stored with a durable queue (a
        queue placed again must find the same id, or it is not the same queue)."""
        control = self._running_control()
        queue_id = control.setting(b"queue-id", uuid.uuid4().hex.encode()) or b""
        return self.host, queue_id.decode()

    def payload_key(self, proposed: bytes | None) -> bytes | None:
        """The queue's payload key: the one it stored (durable), else ``proposed`` (kept if durable)."""
        return self._running_control().setting(b"payload-key", proposed)

    def consumer_left(self, ident: bytes) -> bool:
        """Consumer ``ident``'s worker left the cluster (its pool saw it): its leased chunks go back
        to the queue within a heartbeat interval (see :meth:`~zdq.broker.control.BrokerControl.consumer_left`)."""
        return self._running_control().consumer_left(ident)

    def holds_nothing(self) -> bool:
        """Whether the queue holds nothing sealed with its payload key (no chunk, kept result or
        schedule: see :meth:`~zdq.storage.base.Storage.holds_nothing`)."""
        return self._running_control().holds_nothing()

    def join_key(self, key: bytes) -> bytes | None:
        """Take the pool's payload key ``key`` unless this durable queue holds something sealed
        with a key of its own; return the key it keeps (``key``, or its own: then it is another
        pool's queue). A pool that grew opens its new queues with a key of their own first."""
        return self._running_control().adopt_setting(b"payload-key", key)

    def _running_control(self) -> BrokerControl:
        if self._core is None:
            raise ClosedError(f"broker {self.name} is not started")
        if self._core._error is not None:
            raise ZdqError(f"broker {self.name} loop failed: {self._core._error!r}") from self._core._error
        return self._core.control

    def statistics(self) -> BrokerStats:
        stats = self._running_control().statistics(self.endpoint)
        # The handshakes are judged outside the loop, by the process's ZAP handler (zdq.transport.security).
        return stats if self._auth is None else replace(stats, refused_peers=self._auth.refused)

    def dead_letters(self) -> list[DeadLetter]:
        return self._running_control().dead_letters()

    def add_schedule(self, record: bytes) -> bytes:
        """Keep a schedule (a packed :class:`~zdq.codec.schedules.ScheduleRecord`) with this
        queue; a named one replaces the schedule of its name. Return the record kept."""
        return self._running_control().add_schedule(record)

    def cancel_schedule(self, schedule: int | str) -> bool:
        """End the schedule of this id or name; False if this queue keeps none."""
        return self._running_control().cancel_schedule(schedule)

    def schedules(self) -> list[bytes]:
        return self._running_control().schedules()

    def set_rate_limit(self, rate: float | None, key: bytes = b"") -> None:
        """This queue's own limit (tasks per second; ``None``: none), or a per-call ``key``'s."""
        self._running_control().set_rate_limit(rate, key)

    def task_state(self, task_id: int) -> tuple[str, bytes | None, str]:
        """Where task ``task_id`` stands in this queue (:mod:`zdq.broker.task_state`)."""
        return self._running_control().task_state(task_id)

    def requeue_dead(self, chunk_ids: list[int] | None = None) -> int:
        return self._running_control().requeue_dead(chunk_ids)

    def purge_dead(self, chunk_ids: list[int] | None = None) -> int:
        return self._running_control().purge_dead(chunk_ids)

    def purge_ready(self) -> int:
        return self._running_control().purge_ready()
