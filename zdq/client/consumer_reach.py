"""Whether the queues of a ConsumerPool are reached by the consumers that serve them.

``start()`` first asks the brokers, over the driver's own sockets, which consumers they hear
(a SYNC each, no Dask actor call): when every consumer is heard by every queue it serves, all is
well, and placing a large pool costs no round of actor calls for it. Else it asks every consumer
(one actor call per worker), which also says why one does not reach a queue, still asking the
brokers for a second meanwhile (the first of the two to say all is well ends the wait), and raises
for a queue none reaches.
Later, a queue may stop being reached: placed again where its consumers' packets do not get
through (the QueuePool's supervisor tells of the move), or gone silent to the consumers that
reached it (a network cut since, its worker stopped: the consumers say so in their checkup). The
consumers serving it are then asked in the background (the supervisor that tells of a move must
not wait ``connect-timeout`` for them); this pool's supervisor judges their answers and asks
again while the queue stays unreached, and ``join()`` raises what was found instead of waiting.

Ownership
---------
==================================  ===============================================================
state                               owner
==================================  ===============================================================
``_reach_checks``, ``_reach_gen``,  ``_lock`` (written by the queue pool's supervisor, which tells
``_orphans``                        of moves, by ``start()``, which found queues none reaches, and
                                    by the consumer pool's supervisor, which judges; read by
                                    ``join()`` and ``result()``)
``_silence_asked``,                 the consumer pool's supervisor thread
``_partial_said``
==================================  ===============================================================
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from distributed import Client

from zdq.client.driver import Driver
from zdq.client.slots import ActorSlots, answers_within
from zdq.config import PoolSettings
from zdq.errors import PlacementError
from zdq.transport.protocol import consumer_digest
from zdq.transport.reach import DRIVER_HEARS_NOTHING, OPEN_BETWEEN_WORKERS, WENT_SILENT, describe
from zdq.transport.security import ClientKeys

__all__ = ["ConsumerReach", "FedPool", "Served", "ReachAnswers"]

logger = logging.getLogger(__name__)

#: A queue that a consumer reached, then heard nothing from (a network cut after start(), a
#: stopped broker), is asked of every consumer serving it at most this often while it lasts.
_SILENCE_REASK = 30.0

#: Seconds between two asks of the brokers, while the consumers' answers are awaited ...
_HEARD_STEP = 0.01
#: ... for this long at most: then the consumers' answers alone are awaited, as ever (a call to a
#: consumer whose worker left never settles: that wait sees the worker gone, and gives it up).
_HEARD_WITHIN = 1.0
#: Seconds the brokers are given to answer one such ask (they answer in milliseconds; one that
#: does not is left to the consumers' answers, and holds the step up by about twice this: the
#: ask before the actor calls, and the one in flight when they are answered).
_HEARD_ASK = 0.1

ReachAnswers = list[tuple[str, tuple[list[str], list[tuple[str, str, str]]]]]

#: The why of a verdict not held: the consumers reached the queue before, and neither they nor this
#: process hear it now (see :meth:`ConsumerReach._hold_verdict`).
SILENT_TO_ALL = "silent to this process and to its consumers alike: not held"


def _silences_only(queue: str, answers: ReachAnswers) -> bool:
    """Whether every consumer that cannot reach ``queue`` heard it before (it went silent), and
    some cannot."""
    whys = [why for _, (_, failed) in answers for q, _, why in failed if q == queue]
    return bool(whys) and all(WENT_SILENT in why for why in whys)


class FedPool(Protocol):
    """What the consumers need of their QueuePool: its public edge only."""

    name: str
    dirpath: str | None
    n_queues: int
    queue_names: list[str]

    @property
    def endpoints(self) -> list[str]: ...

    @property
    def client_keys(self) -> ClientKeys | None: ...

    @property
    def payload_key(self) -> bytes | None: ...

    @property
    def driver(self) -> Driver: ...

    def workers(self) -> list[str]: ...

    def broker_actor(self, i: int) -> Any: ...


class Served(Protocol):
    """What the reach checks need of the consumers (:class:`~zdq.client.consumers.ConsumerSlots`)."""

    names: list[str]
    slots: ActorSlots[Any]
    served: list[list[int]]  # the queues each slot serves, by index
    identities: list[list[bytes]]  # each slot's routing identities, the current one last

    def live(self, serving: int | None = None) -> list[tuple[int, str, Any]]: ...

    def placement(self) -> dict[int, str]: ...


class ConsumerReach:
    """The reach of ``consumers`` (placed by one ConsumerPool) to the queues of ``queue_pool``:
    asked, judged, and the queues none reaches held until some consumer does."""

    def __init__(self, consumers: Served, client: Client, queue_pool: FedPool, settings: PoolSettings) -> None:
        self._consumers = consumers
        self.client = client
        self.queue_pool = queue_pool
        self.settings = settings
        self._lock = threading.Lock()
        # Queues placed again since start(), or gone silent: whether some consumer reaches them.
        # queue -> (when to judge at the latest, [(consumer, its reach() future)], its placement)
        self._reach_checks: dict[int, tuple[float, list[tuple[str, Any]], int]] = {}
        self._reach_gen: dict[int, int] = {}  # queue -> how often it was placed again
        self._orphans: dict[int, str] = {}  # queue -> why no consumer reaches it (join raises it)
        #: broker -> not before when to ask again who reaches it (some consumer says it went silent).
        self._silence_asked: dict[int, float] = {}
        #: broker -> what was said of the consumers that cannot reach it (others do): said once.
        self._partial_said: dict[int, str] = {}

    def supervise_once(self, running: bool, stopping: Callable[[], bool], silent: set[str]) -> None:
        """The pool supervisor's round: judge the checks whose answers are in, and ask who
        reaches the queues some consumers found ``silent``."""
        if self._reach_checks:
            self._judge_reach(running, stopping)
        if silent:
            self._ask_who_hears(silent)
        if self._partial_said and running and not stopping():
            # Some consumers could not reach these (others do): asked again now and then, so that
            # a cut that healed is seen, and the next one is said and asked at once.
            now = time.monotonic()
            for broker in list(self._partial_said):
                self._ask_again(broker, now)

    def broker_moved(self, broker: int, endpoint: str, running: bool) -> None:
        """Every consumer serving ``broker`` reconnects to ``endpoint``, each told on its own: one
        on a dead worker (replaced, with the current endpoints, by the supervisor) never keeps
        the others uninformed."""
        queue = self.queue_pool.queue_names[broker]
        with self._lock:
            # A new placement: what was found of the last one no longer holds, and a check of it
            # still out is stale (its generation is behind).
            self._reach_gen[broker] = self._reach_gen.get(broker, 0) + 1
            self._orphans.pop(broker, None)
            self._reach_checks.pop(broker, None)
            gen = self._reach_gen[broker]
        calls = []
        for _, name, consumer in self._consumers.live(serving=broker):
            try:
                calls.append((name, consumer.set_endpoint(broker, endpoint)))
            except Exception as e:
                logger.debug("pointing consumer %s at queue %s failed: %s", name, queue, e)
        for name, call in calls:
            try:
                call.result(timeout=30)
            except Exception as e:  # a lost consumer is replaced with the new endpoints anyway
                logger.debug("pointing consumer %s at queue %s failed: %s", name, queue, e)
        if running:
            self._ask_reach(broker, gen)

    def _reach_calls(self, broker: int) -> list[tuple[str, Any]]:
        """``consumer.reach([queue])`` of every live consumer serving ``broker``: (name, call)."""
        queue = self.queue_pool.queue_names[broker]
        calls = []
        for _, name, consumer in self._consumers.live(serving=broker):
            try:
                calls.append((name, consumer.reach([queue])))
            except Exception as e:  # a lost consumer is replaced, and the replacement connects anew
                logger.debug("reach on consumer %s failed: %s", name, e)
        return calls

    def _ask_reach(self, broker: int, gen: int) -> None:
        """Ask the consumers serving ``broker`` whether they reach it (placement ``gen`` of it)."""
        calls = self._reach_calls(broker)
        s = self.settings
        judge_by = time.monotonic() + s.connect_timeout + 2 * s.heartbeat_interval + 10
        with self._lock:
            if self._reach_gen.get(broker, 0) == gen:  # else it moved meanwhile: a newer check runs
                self._reach_checks[broker] = (judge_by, calls, gen)

    def _judge_reach(self, running: bool, stopping: Callable[[], bool]) -> None:
        """Judge the reach checks whose answers are all in (or overdue)."""
        now = time.monotonic()
        with self._lock:
            due = {
                broker: (calls, gen)
                for broker, (judge_by, calls, gen) in self._reach_checks.items()
                if now >= judge_by or all(call.done() for _, call in calls)
            }
            for broker in due:
                del self._reach_checks[broker]
        for broker, (calls, gen) in due.items():
            answers = []
            for name, call in calls:
                try:
                    answers.append((name, call.result(timeout=0.1)))
                except Exception as e:
                    logger.debug("reach on consumer %s failed: %s", name, e)
            verdict = self._hold_verdict(broker, gen, answers)
            if verdict is None:
                continue  # the queue moved since it was asked: a newer check judges it
            unreached, was, why = verdict
            queue = self.queue_pool.queue_names[broker]
            if not unreached and (was is not None or not why):
                # Reached again, or by all: a silence said from now on is a new cut, asked at once.
                self._silence_asked.pop(broker, None)
            if why == SILENT_TO_ALL:
                self._partial_said.pop(broker, None)
                if was is not None:
                    logger.warning(
                        "queue %s is silent to this process too now (its worker stopped or starved, or its host cut "
                        "off): no longer held as reached by no consumer; join() waits for it", queue,
                    )
                continue
            if unreached:
                if was is None:
                    logger.error("%s", why)
                if running and not stopping():
                    self._ask_reach(broker, gen)  # until some consumer reaches it
            elif was is not None:
                logger.warning("queue %s is reached by consumers of pool %s again", queue, self.queue_pool.name)
            elif why and self._partial_said.get(broker) != why:
                logger.warning("%s", why)  # some consumers cannot reach it: said once while it lasts
            if not why:
                self._partial_said.pop(broker, None)
            elif not unreached:
                self._partial_said[broker] = why

    def note_unreached(self, orphans: list[str], why: str) -> None:
        """``start()`` found ``orphans``, queues no consumer reaches (``why``): held as a move's
        check holds them, so that ``join()`` raises it rather than waiting for its timeout, and
        asked again by the supervisor until some consumer reaches them."""
        names = self.queue_pool.queue_names
        for queue in orphans:
            broker = names.index(queue)
            with self._lock:
                self._orphans[broker] = why
                gen = self._reach_gen.get(broker, 0)
            self._ask_reach(broker, gen)

    def _hold_verdict(self, broker: int, gen: int, answers: ReachAnswers) -> tuple[bool, str | None, str] | None:
        """Judge the consumers' reach ``answers`` of queue ``broker`` (placement ``gen`` of it) and
        hold the verdict: ``(unreached, the why held before, the why now)``, or ``None`` when the
        queue moved since it was asked (a newer check judges it).

        A queue that its consumers reached before and hear nothing from, and that this process
        does not hear either, is not held (the why now is :data:`SILENT_TO_ALL`): its broker is
        silent to everyone, stopped or starved (or its host cut off from all), which silence
        alone does not make lost. ``join()`` waits for it; its timeout says it has not answered."""
        orphans, why = self.reach_verdict(answers)
        queue = self.queue_pool.queue_names[broker]
        unreached = queue in orphans
        if unreached and _silences_only(queue, answers) and not self._driver_hears(broker):
            unreached, why = False, SILENT_TO_ALL
        if not unreached and why != SILENT_TO_ALL and not any(queue in ok for _, (ok, _) in answers):
            # No consumer says it reaches the queue: none answered in time, or each was still
            # connecting when its wait ended. A verdict held stands (it said "reached again" on
            # no evidence, in CI under load, and join() waited its timeout where it should raise).
            with self._lock:
                held = self._orphans.get(broker) if self._reach_gen.get(broker, 0) == gen else None
            if held is not None:
                return True, held, held
        with self._lock:
            if self._reach_gen.get(broker, 0) != gen:
                return None
            was = self._orphans.pop(broker, None)
            if unreached:
                self._orphans[broker] = why
        return unreached, was, why

    def still_unreached(self, broker: int, timeout: float = 5.0) -> bool:
        """Whether queue ``broker``, held as reached by none of these consumers, still is: asked
        again now, before ``join()`` or ``result()`` raise it. A broker resumed a moment ago answers
        its status the moment its consumers reach it again, before a round of the supervisor has
        judged them: asked twice, a second apart, when the first answers say none reaches it. A
        verdict that no longer holds is dropped. Bounded by ``timeout``; a consumer that does not
        answer leaves the verdict as it is."""
        queue = self.queue_pool.queue_names[broker]
        deadline = time.monotonic() + timeout
        for ask in (1, 2):
            with self._lock:
                if broker not in self._orphans:
                    return False
                gen = self._reach_gen.get(broker, 0)
            answers: ReachAnswers = []
            for name, call in self._reach_calls(broker):
                try:
                    answers.append((name, call.result(timeout=max(0.1, deadline - time.monotonic()))))
                except Exception as e:  # noqa: BLE001 - the verdict stands
                    logger.debug("reach on consumer %s failed: %s", name, e)
            if not answers:
                return True
            verdict = self._hold_verdict(broker, gen, answers)
            if verdict is None:  # placed again meanwhile: what was found no longer holds
                return False
            if not verdict[0]:
                if verdict[2] != SILENT_TO_ALL:
                    logger.warning("queue %s is reached by consumers of pool %s again", queue, self.queue_pool.name)
                return False
            if ask == 1 and deadline - time.monotonic() > 1.0:
                time.sleep(1.0)
        return True

    def orphans(self) -> dict[int, str]:
        """Queues none of these consumers reaches (found so by ``start()``, or placed again where
        none reaches them), with why; until some consumer reaches them."""
        with self._lock:
            return dict(self._orphans)

    def check_reach(self, *, placing: bool = False) -> tuple[list[str], str]:
        """Wait until every consumer heard from its brokers or reported them unreachable; the
        queues reached by none, and what to tell (see :meth:`reach_verdict`). Queues that are down
        (being placed again) are not waited for: the consumers are told where they went.

        A consumer whose sockets could not be opened (they open in the background, see
        :meth:`Consumer.start`) answers with its :class:`PlacementError`, naming it and its worker:
        with ``placing`` (a pool placed started) they are raised together; else each is a warning
        (the supervisor replaces such a consumer, as before)."""
        up = self.queues_up()
        unheard = self._expected(up)
        if unheard is not None and self._brokers_hear(unheard, lambda: True):
            return [], ""  # one ask of the brokers was enough: no actor call
        wait = self.settings.connect_timeout + 2 * self.settings.heartbeat_interval + 10
        deadline = time.monotonic() + wait
        answers: ReachAnswers = []
        failed: list[str] = []
        by_worker, asking = self._ask_by_worker(up)
        hearing_until = min(deadline, time.monotonic() + _HEARD_WITHIN)
        if unheard is not None and self._brokers_hear(
            unheard, lambda: time.monotonic() >= hearing_until or all(call.done() for call, _ in asking.values())
        ):
            return [], ""  # the brokers heard every consumer before the consumers answered
        asked = self._by_worker(by_worker, asking, max(0.0, deadline - time.monotonic()))
        calls: dict[str, tuple[Any, str]] = {}
        placed_on = self._consumers.placement()
        for i, name, consumer in self._consumers.live():
            if i in asked:
                answer = asked[i]
                if isinstance(answer, str):
                    failed.append(answer)
                elif answer is not None:  # None: its worker left, it is replaced
                    answers.append((name, answer))
                continue
            try:  # not answered for by its worker: asked itself
                calls[name] = (consumer.reach(up), placed_on.get(i, ""))
            except Exception as e:  # its worker is gone: the supervisor replaces it
                logger.debug("reach on consumer %s failed: %s", name, e)
        told, errors, gone, _ = answers_within(self.client, calls, wait)
        answers.extend((name, told[name]) for name in calls if name in told)
        for name, error in errors.items():
            if isinstance(error, PlacementError):
                failed.append(str(error))
            else:
                logger.debug("reach on consumer %s failed: %s", name, error)
        for name in gone:
            logger.debug("reach on consumer %s: its worker left the cluster (it is replaced)", name)
        if failed and placing:
            raise PlacementError("; ".join(failed))
        for why in failed:
            logger.warning("%s; placing a replacement", why)
        return self.reach_verdict(answers)

    def _expected(self, up: list[str]) -> dict[int, set[bytes]] | None:
        """Broker -> the digests (:func:`~zdq.transport.protocol.consumer_digest`) of the live
        consumers that serve it, for the queues ``up``; None when there is none, or a consumer's
        identity is not known (its slot is being filled): the consumers are then asked
        themselves, as ever."""
        names = self.queue_pool.queue_names
        expected: dict[int, set[bytes]] = {}
        identities = self._consumers.identities
        for i, _, _ in self._consumers.live():
            if not identities[i]:
                return None
            for q in self._consumers.served[i]:
                if names[q] in up:
                    expected.setdefault(q, set()).add(consumer_digest(identities[i][-1]))
        return expected or None

    def _brokers_hear(self, unheard: dict[int, set[bytes]], stop: Callable[[], bool]) -> bool:
        """Whether the brokers hear every consumer of ``unheard`` (broker -> digests; what they are
        found to hear is taken out of it), asked over the driver's sockets
        (``queue_status(consumers=True)``, no Dask actor call) every :data:`_HEARD_STEP` seconds
        until they do (True) or ``stop()`` says to give up (False), which is asked after each ask."""
        driver = self.queue_pool.driver
        while True:
            statuses = driver.queue_status(timeout=_HEARD_ASK, consumers=True)
            for q in list(unheard):
                status = statuses[q]
                if status is not None and status.consumer_digests is not None:
                    unheard[q].difference_update(status.consumer_digests)
                    if not unheard[q]:
                        del unheard[q]
            if not unheard:
                return True
            if stop():
                return False
            time.sleep(_HEARD_STEP)

    def _reach_by_worker(self, up: list[str], wait: float) -> dict[int, Any]:
        """Ask one consumer per worker for the reach of every consumer placed there
        (``Consumer.reach_here``): one actor call per worker, not per consumer. By slot: the
        answer, or the message of a consumer that could not open its sockets; a slot left out
        (its worker did not answer for it) is asked by the caller."""
        by_worker, calls = self._ask_by_worker(up)
        return self._by_worker(by_worker, calls, wait)

    def _ask_by_worker(self, up: list[str]) -> tuple[dict[str, list[tuple[int, str, Any]]], dict[str, tuple[Any, str]]]:
        """The calls of :meth:`_reach_by_worker`, made: the consumers placed on each worker
        (slot, future key, actor), and each worker's call (its future, the worker)."""
        by_worker: dict[str, list[tuple[int, str, Any]]] = {}
        futures = self._consumers.slots.futures()
        placed_on = self._consumers.placement()
        for i, _, consumer in self._consumers.live():
            fut = futures[i]
            if fut is not None and i in placed_on:
                by_worker.setdefault(placed_on[i], []).append((i, str(fut.key), consumer))
        calls: dict[str, tuple[Any, str]] = {}
        for worker, here in by_worker.items():
            try:
                calls[worker] = (here[0][2].reach_here([key for _, key, _ in here], up), worker)
            except Exception as e:  # its worker is gone: the supervisor replaces its consumers
                logger.debug("reach of the consumers on %s failed: %s", worker, e)
        return by_worker, calls

    def _by_worker(
        self, by_worker: dict[str, list[tuple[int, str, Any]]], calls: dict[str, tuple[Any, str]], wait: float
    ) -> dict[int, Any]:
        """The answers of :meth:`_ask_by_worker`'s calls, within ``wait`` seconds, by slot."""
        answers, errors, gone, _ = answers_within(self.client, calls, wait)
        out: dict[int, Any] = {}
        for worker, here in by_worker.items():
            if worker in gone:
                # Its worker left (killed): its consumers are lost, and replaced; not asked again.
                out.update({i: None for i, _, _ in here})
            elif worker in answers:
                told = answers[worker]
                out.update({i: told[key] for i, key, _ in here if key in told})
            elif worker in errors:  # each of them is asked by the caller
                logger.debug("reach of consumers %s failed: %s", [i for i, _, _ in here], errors[worker])
        return out

    def reach_verdict(self, answers: ReachAnswers) -> tuple[list[str], str]:
        """From the consumers' ``reach()`` answers: the queues that are up and that no consumer
        reaches, and what to tell the user (empty when every consumer reaches all it serves)."""
        qp = self.queue_pool
        reached: set[str] = set()
        missed: dict[str, list[tuple[str, str, str]]] = {}  # queue -> (consumer, endpoint, why)
        for name, (ok, failed) in answers:
            reached.update(ok)
            for queue, endpoint, why in failed:
                missed.setdefault(queue, []).append((name, endpoint, why))
        up = self.queues_up()  # a queue lost meanwhile is the supervisor's, not unreachable
        missed = {queue: tries for queue, tries in missed.items() if queue in up}
        if not missed:
            return [], ""
        workers = dict(zip(qp.queue_names, qp.workers()))
        placed_on = self._consumers.placement()
        where = {name: placed_on.get(i, "?") for i, name in enumerate(self._consumers.names)}
        # A broker the driver does not hear either is silent to everyone (its worker stopped or
        # starved), whatever the consumers' connections say: said so, rather than blamed on a
        # port or a socket's path. Healthy brokers beat every heartbeat interval.
        quiet = self._quiet()
        silence = {name: qp.driver.broker_silence(i) for i, name in enumerate(qp.queue_names) if name in missed}
        unheard = {queue: f"; {DRIVER_HEARS_NOTHING} for {s:.0f} s" for queue, s in silence.items() if s >= quiet}
        lines = [
            (queue, endpoint, workers.get(queue, ""), f"{consumer} on {where.get(consumer, '?')}: {why}{unheard.get(queue, '')}")
            for queue, tries in missed.items()
            for consumer, endpoint, why in tries
        ]
        orphans = [queue for queue in missed if queue not in reached]
        if orphans:
            subject = (
                f"no consumer of pool {qp.name} reaches {', '.join(orphans)}: their tasks would never run "
                "(the consumers keep running and connecting)"
            )
        else:
            subject = f"some consumers of pool {qp.name} cannot reach some of its queues (other consumers serve them)"
        return orphans, describe(subject, lines, OPEN_BETWEEN_WORKERS)

    def _driver_hears(self, broker: int) -> bool:
        """Whether this process still hears ``broker``. The consumers tell a silence after
        heartbeat-timeout; this process, which hears the same beats, then hears nothing for about
        as long if the broker itself is silent."""
        silence = self.queue_pool.driver.broker_silence(broker)
        return silence < min(self._quiet(), self.settings.heartbeat_timeout / 2)

    def _quiet(self) -> float:
        """How long the pool's driver hears nothing of a broker before it counts as silent to it
        too (healthy brokers beat every heartbeat interval)."""
        return max(3 * self.settings.heartbeat_interval, 1.0)

    def queues_up(self) -> list[str]:
        qp = self.queue_pool
        return [name for name, up in zip(qp.queue_names, qp.driver.links_up()) if up]

    def _ask_who_hears(self, queues: set[str]) -> None:
        """Some consumers reached ``queues`` once and hear nothing from them now: ask every
        consumer serving each whether it reaches it (at most every :data:`_SILENCE_REASK`
        seconds). If none does, the verdict is held as :meth:`check_reach`'s is, and ``join()``
        raises it rather than waiting; it is dropped once some consumer hears the queue again.

        A queue this process does not hear either is not asked about: its broker is silent to
        everyone (its worker stopped, or starved by a task holding the GIL), and silence alone is
        not a loss (its tasks run once it runs again; the queue pool's supervisor and ``join()``'s
        timeout say it is silent). What is held is a path cut between consumers and a broker
        that still runs."""
        now = time.monotonic()
        names = self.queue_pool.queue_names
        for queue in sorted(queues):
            if queue not in names:
                continue
            broker = names.index(queue)
            if self._driver_hears(broker):
                self._ask_again(broker, now)

    def _ask_again(self, broker: int, now: float) -> None:
        """Ask who reaches ``broker``, unless a check of it is out, it is held unreached (asked
        again until reached), or it was asked less than :data:`_SILENCE_REASK` seconds ago."""
        with self._lock:
            if broker in self._reach_checks or broker in self._orphans:
                return
            gen = self._reach_gen.get(broker, 0)
        if now < self._silence_asked.get(broker, 0.0):
            return
        self._silence_asked[broker] = now + _SILENCE_REASK
        self._ask_reach(broker, gen)
