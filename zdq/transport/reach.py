"""Reachability: whether a driver or consumer hears from the brokers it connects to, and why not.

zdq's data plane goes straight from drivers and consumers to the brokers' ports on the workers.
ZeroMQ connects in the background and retries for ever, so a broker behind a firewall, or a client
outside the workers' network, would only ever look silent. A broker answers the HELLO of every new
connection (with a HEARTBEAT): a peer that hears nothing for ``connect-timeout`` after connecting
reports the broker unreachable (:class:`~zdq.errors.BrokerUnreachable`), and says why from what
ZeroMQ's socket monitor saw of that connection (a :class:`Watch`, kept only until the broker is
heard from): refused, unanswered, the CurveZMQ handshake refused, or connected and silent.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

__all__ = [
    "Watch", "Heard", "describe", "over_ipc", "CLIENT_OUTSIDE", "OPEN_TO_CLIENT", "OPEN_BETWEEN_WORKERS", "CHECK_IPC_PATH",
    "DRIVER_HEARS_NOTHING", "RESUME_THE_BROKER", "CONNECTED_NO_ANSWER", "WENT_SILENT", "REACHED_BEFORE",
]

_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_DELAYED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)

#: What to do, said after the brokers a driver cannot reach, when it reaches none of them.
CLIENT_OUTSIDE = (
    "This process reaches the Dask scheduler but none of the brokers' zdq ports on the workers: zdq's "
    "tasks and results go straight between this process and the workers, not through the scheduler. If "
    "this client is outside the workers' network (Dask Gateway, Kubernetes, a laptop on a cloud cluster), "
    "make the pool with relay=True (or set zdq.relay: true): its tasks and results then go through a relay "
    "actor on a worker, over Dask's own comm (slower than the direct path); or run the client inside that "
    "network (a notebook, job or pod on the cluster). Otherwise open TCP from here to the workers on the "
    "brokers' ports (zdq.ports fixes their range, zdq.bind-host the address they bind)."
)
#: What to do when a driver reaches some brokers and not others.
OPEN_TO_CLIENT = (
    "Open TCP from this process to those workers on the brokers' ports (zdq.ports fixes their range, "
    "zdq.bind-host the address they bind), or place the queues on workers it reaches (workers=)."
)
#: What to do when consumers cannot reach brokers.
OPEN_BETWEEN_WORKERS = (
    "Consumers connect to their brokers over TCP: open the brokers' ports (zdq.ports fixes their range) "
    "between the workers, or place consumers and queues on workers that reach each other (workers=)."
)


#: How a link's reason starts when it went over a broker's Unix socket (:func:`over_ipc`).
OVER_IPC = "over this host's Unix socket"
#: What to do when every broker not heard from was tried over its Unix socket.
CHECK_IPC_PATH = (
    "Those brokers were tried over their Unix sockets (ipc://, their host's peers use no TCP port). If the "
    "broker's worker is stopped (e.g. by SIGSTOP) or too busy, resume it or give it CPU. Else a process other "
    "than that worker may hold the path: `ss -xlp | grep <path>` names who listens there; if it is another "
    "process, stop it and make the pool again (its brokers bind their paths anew), or set ZDQ_IPC_DIR to "
    "another directory. Never remove the file of a broker that lives: its consumers could no longer reach it."
)


#: How a link's reason ends when the pool's driver has not heard that broker either
#: (:func:`~zdq.client.consumer_reach.ConsumerReach.reach_verdict` adds it).
DRIVER_HEARS_NOTHING = "this pool's driver has not heard that broker either"
#: What to do when the driver hears none of the brokers the consumers cannot reach: the broker,
#: not the network or a socket's path, is what does not answer.
RESUME_THE_BROKER = (
    "The pool's own driver hears nothing from those brokers either, so neither the network nor a socket's path "
    "is at fault: their worker process is stopped (e.g. by SIGSTOP) or too busy to run them. Resume it (SIGCONT) or "
    "give it CPU: the consumers reach the broker once it runs."
)


#: What to do when a connection to each broker not heard from was made, but none answered: its
#: port or path is open, so the broker itself does not run.
CONNECTED_NO_ANSWER = (
    "A connection to each of those brokers was made, so their ports are open, but none answered: their "
    "worker process is likely stopped (e.g. by SIGSTOP) or too busy to run them. Resume it (SIGCONT) or give "
    "it CPU: the consumers reach the broker once it runs."
)
_CONNECTED = ("handshake never completed", "handshake succeeded")

#: How a consumer's reason starts for a broker it heard from, then heard nothing from.
WENT_SILENT = "reached before, then heard nothing from it"
#: What to do when the consumers that cannot reach some brokers reached them before (and the
#: driver still hears those brokers): the path between them broke after they connected.
REACHED_BEFORE = (
    "Those consumers reached their brokers before: the network between their workers and the brokers' was cut "
    "since (a route, a firewall, a host gone off the network), while this process still hears the brokers. "
    "They keep their connections and resume the moment it carries them again; meanwhile the tasks they held go "
    "back to their queues after heartbeat-timeout, for the consumers that do reach them."
)


def over_ipc(address: str, endpoint: str, why: str) -> str:
    """The reason a broker reached over its Unix socket ``address`` (instead of TCP ``endpoint``)
    was not heard from: the path actually used, and what to check there. A connection that was
    made but never completed its handshake is as likely a stopped broker as a foreign listener."""
    path = address[len("ipc://") :]
    if "handshake failed" in why:
        check = f" (does another process listen at {path}?)"
    elif "never completed" in why or "sent nothing" in why:
        check = f" (the broker's process is stopped or too busy, or another process listens at {path})"
    else:
        check = ""
    return f"{OVER_IPC} {address} (not {endpoint}): {why}{check}"


class Watch:
    """What ZeroMQ's monitor saw of one DEALER's connection, until the broker is heard from.

    Made before the socket connects (so that it sees the first attempt) and closed by
    :meth:`close`; owned by the thread that owns the socket.
    """

    def __init__(self, sock: zmq.Socket[Any], transport: str = "TCP") -> None:
        self._sock = sock
        self._transport = transport  # named in what it says: "TCP", or "Unix-socket" for ipc://
        self._monitor = sock.get_monitor_socket(_EVENTS, addr=f"inproc://zdq-watch-{os.urandom(8).hex()}")
        self._seen: set[int] = set()

    def why(self) -> str:
        """Why the broker was not heard from, as far as the connection tells."""
        while self._monitor.poll(0):
            self._seen.add(int(recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]))
        seen, kind = self._seen, self._transport
        if zmq.EVENT_HANDSHAKE_FAILED_AUTH in seen:
            return "the broker refused this peer's CurveZMQ keys (they are another pool's?)"
        if seen & {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}:
            return f"a {kind} connection was made, but the CurveZMQ handshake failed (is a zdq broker listening there?)"
        if zmq.EVENT_HANDSHAKE_SUCCEEDED in seen:
            return "connected (the handshake succeeded), but the broker sent nothing (its worker is stalled?)"
        if zmq.EVENT_CONNECTED in seen:
            return f"a {kind} connection was made, but the handshake never completed"
        if zmq.EVENT_CONNECT_RETRIED in seen:
            return (
                f"every {kind} connection attempt failed at once: refused (nothing listens there) "
                "or no route to that host"
            )
        if zmq.EVENT_CONNECT_DELAYED in seen:
            return f"{kind} connection attempts went unanswered (packets dropped: a firewall, or a host outside this network)"
        return "no connection attempt was reported"

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass  # the socket is closed already, and its monitor with it
        self._monitor.close(linger=0)


class Heard:
    """Which brokers a consumer has heard from since it connected to each, and why not, for
    those past the timeout; and which of those heard from went silent since. Owned by the
    consumer's socket owner; other threads read copies.

    ``last`` is written by the owner's loop for every broker it reads a message from (a list
    store per turn: brokers beat every heartbeat interval, so a broker heard from that sends
    nothing for the heartbeat timeout is cut off, stopped or starved: :meth:`went_silent`)."""

    __slots__ = ("heard", "last", "silent", "since", "why")

    def __init__(self, n: int, now: float) -> None:
        self.heard = [False] * n
        self.since = [now] * n  # when each connection was made
        self.why: dict[int, str] = {}  # brokers reported unreachable, and why
        self.last = [now] * n  # when each was last heard from (or connected to)
        self.silent: dict[int, str] = {}  # brokers heard from once, silent since, and why

    def restart(self, i: int, now: float) -> None:
        """Broker ``i`` has a new connection (it was placed again)."""
        self.heard[i] = False
        self.since[i] = self.last[i] = now
        self.why.pop(i, None)
        self.silent.pop(i, None)

    def overdue(self, now: float, timeout: float) -> list[int]:
        """Brokers not heard from ``timeout`` after connecting, and not reported yet."""
        return [
            i for i, heard in enumerate(self.heard) if not heard and i not in self.why and now - self.since[i] >= timeout
        ]

    def settled(self) -> bool:
        """Whether every broker was heard from or reported."""
        return all(heard or i in self.why for i, heard in enumerate(self.heard))

    def went_silent(self, now: float, timeout: float) -> list[int]:
        """Brokers heard from before that have sent nothing for ``timeout``, not reported yet."""
        return [
            i for i, heard in enumerate(self.heard) if heard and i not in self.silent and now - self.last[i] >= timeout
        ]

    def was_deaf(self, now: float) -> None:
        """The owner's loop did not run for a while (its process stopped or starved): what the
        brokers sent meanwhile is unread, not missing; each gets a whole timeout from now."""
        self.last[:] = [now] * len(self.last)  # in place: the loop holds this list


def describe(subject: str, brokers: Iterable[tuple[str, str, str, str]], advice: str) -> str:
    """The message of a :class:`~zdq.errors.BrokerUnreachable`: ``subject``, a line per broker
    ``(queue, endpoint, worker, why)``, and what to do."""
    brokers = list(brokers)
    lines = [
        f"  {queue} at {endpoint} (worker {worker or 'unknown'}): {why}" for queue, endpoint, worker, why in brokers
    ]
    if brokers and all(DRIVER_HEARS_NOTHING in why for *_, why in brokers):
        advice = RESUME_THE_BROKER  # the broker is silent to everyone: no port or path is at stake
    elif brokers and all(WENT_SILENT in why for *_, why in brokers):
        advice = REACHED_BEFORE  # the ports were open: what changed is the path since
    elif brokers and all(OVER_IPC in why for *_, why in brokers):
        advice = CHECK_IPC_PATH  # no TCP port is at stake: the advice to open ports would mislead
    elif brokers and all(any(c in why for c in _CONNECTED) for *_, why in brokers):
        advice = CONNECTED_NO_ANSWER  # the connections were made: the ports are open
    return "\n".join([f"{subject}:", *lines, advice])
