"""The wire protocol: every message round-trips, every malformed one is a ProtocolError."""

from __future__ import annotations

import pickle

import pytest

from zdq.errors import ProtocolError
from zdq.transport import protocol as p

MESSAGES = [
    p.Hello(p.Role.CONSUMER, b"GeneralConsumer-0"),
    p.Put(7, 1000, b"chunk"),
    p.Puts((p.Put(7, 1000, b"chunk-7", base=70), p.Put(8, 3, b"chunk-8", 1_800_000_000.5, -2, 80))),
    p.Puts((p.Put(1, 1, b"a", base=5, expires=9.5, rate_key=b"k", rate=2.0), p.Put(2, 2, b"", base=6),
            p.Put(3, 1, b"c", base=8, unique_key=b"uk", unique_for=3.0))),
    p.Confirm(7, 3, p.Status.STORED, b""),
    p.Confirm(8, 0, p.Status.FULL, b"map full"),
    p.Confirms((7, 8, 9), (3, 4, 12)),
    p.Confirms((), ()),
    p.Fetch(2),
    p.Deliver(3, 1000, 1, b"chunk"),
    p.Done(3, 1000, b"results"),
    p.Done(3, 1000, b"results", 1),
    p.Results(7, 3, b"c" * 16, b"results"),
    p.Return(3),
    p.Ack(3),
    p.Lost(7, 3),
    p.Dead(3, 1005, b"task", b"ValueError: boom"),
    p.Split(3, [b"a", b"b", b"c"]),
    p.Rack((3, 4, 5)),
    p.Fetch(0),
    p.Ready(),
    p.Sync(9),
    p.Sync(9, (1, 2, 3)),
    p.Sync(9, (), True),
    p.Sync(9, (1, 2), True),
    p.QueueStatus(9, 100, 20, 3, 7, 1000),
    p.QueueStatus(9, 0, 0, 0, 0, 0, (4, 5)),
    p.QueueStatus(9, 0, 0, 0, 0, 0, (), ()),
    p.QueueStatus(9, 1, 2, 3, 4, 5, (4, 5), (p.consumer_digest(b"c" * 16), p.consumer_digest(b"d"))),
    p.Cancel(7, 12, 3, (0, 5, 99_999)),
    p.Cancel(0, 12, 0, ()),
    p.Cancelled(7, (5,)),
    p.Heartbeat(),
    p.Bye(),
    p.Who(),
    p.Retried(12, ((40, 2),)),
    p.Retried(12, ((40, 1), (41, 3), (42, p.MAX_FAILED))),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: p.Message) -> None:
    assert p.decode(p.encode(msg)) == msg


def _head(command: int, header: bytes = b"") -> bytes:
    return p.VERSION + bytes([command]) + header


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [p.VERSION],
        [b"ZDQ\x01" + bytes([p.Command.FETCH]) + b"\0\0\0\1"],
        [_head(0xFF)],
        [_head(p.Command.FETCH, b"\0\0\1")],
        [_head(p.Command.FETCH, b"\0\0\0\1"), b"extra"],
        [_head(p.Command.PUT, b"\0" * 12)],
        [_head(p.Command.PUT, b"\0" * 11), b"x"],
        [_head(p.Command.HEARTBEAT, b"x")],
        [_head(p.Command.HELLO, b"\x09"), b""],
        [_head(p.Command.CONFIRM, b"\0" * 16 + b"\x09"), b""],
        [_head(p.Command.BYE), b"extra"],
        [_head(p.Command.SPLIT, b"\0" * 8 + b"\0\0\0\3"), b"a", b"b"],
        [_head(p.Command.SPLIT, b"\0" * 12)],
        [_head(p.Command.DEAD, b"\0" * 16), b"x"],
        [_head(p.Command.RACK, b"\0\0\0\2" + b"\0" * 8)],
        [_head(p.Command.CONFIRMS, b"\0\0\0\1" + b"\0" * 8)],  # a seq without its chunk id
        [_head(p.Command.CONFIRMS, b"\0\0\0\1" + b"\0" * 16), b"extra"],
        [_head(p.Command.CONFIRMS, b"\0\0")],
        [_head(p.Command.SYNC, b"\0" * 8 + b"\0\0\0\1")],
        [_head(p.Command.SYNC, b"\0" * 8)],
        [_head(p.Command.STATUS, b"\0" * 48 + b"\0\0\0\2" + b"\0" * 8)],
        [_head(p.Command.STATUS, b"\0" * 48 + b"\0\0\0\0"), b"d" * 16, b"extra"],
        [_head(p.Command.STATUS, b"\0" * 48 + b"\0\0\0\0"), b"d" * 17],  # a digest cut short
        [_head(p.Command.SYNC, b"\0" * 8 + b"\0\0\0\0"), b"something else"],
        [_head(p.Command.SYNC, b"\0" * 8 + b"\0\0\0\0"), b"consumers", b"extra"],
        [_head(p.Command.READY), b"extra"],
        [_head(p.Command.RACK, b"\0\0\0\1" + b"\0" * 8), b"extra"],
        [_head(p.Command.PUT, b"\0" * 8 + b"\xff\xff\xff\xff"), b"x"],
        [_head(p.Command.DELIVER, b"\0" * 8 + b"\0\0\0\0" + b"\0\0\0\1"), b"x"],
        [_head(p.Command.CANCEL, b"\0" * 24 + b"\0\0\0\2" + b"\0" * 8)],
        [_head(p.Command.CANCEL, b"\0" * 24 + b"\0\0\0\1" + b"\0\0\0\0\xff\xff\xff\xff")],
        [_head(p.Command.CANCELLED, b"\0" * 8 + b"\0\0\0\1")],
        [_head(p.Command.RETRIED, b"\0" * 8 + b"\0\0\0\0")],  # no task
        [_head(p.Command.RETRIED, b"\0" * 8 + b"\0\0\0\2" + b"\0" * 8 + b"\0\0\0\1")],  # one of two
        [_head(p.Command.RETRIED, b"\0" * 8 + b"\0\0\0\1" + b"\0" * 8 + b"\0\0\0\0")],  # failed 0 times
        [_head(p.Command.RETRIED, b"\0" * 8 + b"\0\0\0\1" + b"\0" * 8 + b"\xff\xff\xff\xff")],
        [_head(p.Command.RETRIED, b"\0" * 8 + b"\0\0\0\1" + b"\0" * 8 + b"\0\0\0\1"), b"extra"],
        [object()],
    ],
)
def test_malformed_messages_raise_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        p.decode(frames)


def test_version_command_and_header_share_one_frame() -> None:
    frames = p.encode(p.Put(7, 1000, b"chunk"))
    assert len(frames) == 2 and frames[0].startswith(p.VERSION) and frames[0][len(p.VERSION)] == p.Command.PUT
    assert p.encode(p.Heartbeat()) == [p.VERSION + bytes([p.Command.HEARTBEAT])]


def test_confirms_carry_their_pairs_in_one_frame_and_refuse_unmatched_lists() -> None:
    frames = p.encode(p.Confirms((1, 2), (10, 20)))
    assert len(frames) == 1 and frames[0][len(p.VERSION)] == p.Command.CONFIRMS
    assert len(frames[0]) == len(p.VERSION) + 1 + 4 + 2 * 16
    with pytest.raises(ProtocolError, match="2 seqs and 1 chunk ids"):
        p.encode(p.Confirms((1, 2), (10,)))
    most = tuple(range(p.MAX_SPLIT))
    assert isinstance(p.decode(p.encode(p.Confirms(most, most))), p.Confirms)  # the largest one decodes
    with pytest.raises(ProtocolError, match="at most"):  # one more would not: never sent
        p.encode(p.Confirms((*most, 1), (*most, 1)))


def _puts_frames(*puts: p.Put) -> list[bytes]:
    return [bytes(f) for f in p.encode(p.Puts(puts))]


def test_puts_carry_each_chunk_in_its_own_frame_and_its_tags_with_it() -> None:
    tagged = p.Put(2, 5, b"two", 0.0, 0, 20, 0.0, b"rate-key", 4.0)
    frames = _puts_frames(p.Put(1, 3, b"one", base=10), tagged, p.Put(3, 1, b"three", base=25))
    assert frames[1:] == [b"one", b"two", b"three"]
    decoded = p.decode(frames)
    assert isinstance(decoded, p.Puts)
    assert [put.chunk for put in decoded.puts] == [b"one", b"two", b"three"]
    assert decoded.puts[1] == tagged and decoded.puts[0].rate_key == b"" and decoded.puts[2].rate == 0.0


def _forged_puts() -> list[list[bytes]]:
    """PUTS messages forged from a good one of three chunks (the second tagged)."""
    good = _puts_frames(p.Put(1, 3, b"one", base=10), p.Put(2, 5, b"two", 0.0, 0, 20, 0.0, b"k", 4.0),
                        p.Put(3, 1, b"three", base=25))
    head = good[0]
    count_at = len(p.VERSION) + 1
    chunk_at = count_at + 4
    per_chunk = 36
    tags_len_at = chunk_at + per_chunk + 32  # the second chunk's length of tags
    n_tasks_at = chunk_at + 8  # the first chunk's n_tasks
    not_before_at = chunk_at + 20  # the first chunk's release time
    with_count = lambda n: head[:count_at] + n.to_bytes(4, "big") + head[chunk_at:]  # noqa: E731
    return [
        [head],  # no chunk frame
        good[:3],  # a chunk frame missing
        good + [b"four"],  # a frame too many: it would be read as no chunk's
        [with_count(2)] + good[1:],  # fewer chunks announced than carried
        [with_count(4)] + good[1:],  # more announced than carried
        [with_count(0)],
        [with_count(p.MAX_PUTS + 1)] + [b"x"] * (p.MAX_PUTS + 1),
        [head[: chunk_at + 10]] + good[1:],  # a chunk head cut short
        [head[:-1]] + good[1:],  # the tags cut short
        [head + b"x"] + good[1:],  # bytes no chunk announces
        [head[:tags_len_at] + (99).to_bytes(4, "big") + head[tags_len_at + 4 :]] + good[1:],  # tags longer than carried
        [head[:tags_len_at] + (3).to_bytes(4, "big") + head[tags_len_at + 4 :]] + good[1:],  # tags shorter
        [head[:n_tasks_at] + (0).to_bytes(4, "big") + head[n_tasks_at + 4 :]] + good[1:],  # a chunk of no task
        [head[:n_tasks_at] + (p.MAX_CHUNK_TASKS + 1).to_bytes(4, "big") + head[n_tasks_at + 4 :]] + good[1:],
        [head[:not_before_at] + b"\x7f\xf8" + b"\0" * 6 + head[not_before_at + 8 :]] + good[1:],  # NaN release
        [head[:count_at - 1] + bytes([p.Command.PUTS]) + b"\0\0"],  # a head too short for its count
    ]


@pytest.mark.parametrize("frames", _forged_puts(), ids=range(len(_forged_puts())))
def test_forged_puts_raise_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        p.decode(frames)


def test_a_chunk_of_pickled_tasks_must_hold_pickled_task_tuples() -> None:
    from zdq.codec.tasks import PICKLED, TASKS, dumps_chunk, dumps_task, loads_chunk

    good = dumps_chunk(5, [dumps_task((print, (1,))), dumps_task((None, "item"))], None, PICKLED)
    assert loads_chunk(good) == (5, TASKS, [(print, (1,)), (None, "item")], None)
    with pytest.raises(ValueError, match="other than bytes"):
        loads_chunk(dumps_chunk(5, [(print, (1,))], None, PICKLED))
    with pytest.raises(ValueError, match="not a task tuple"):
        loads_chunk(dumps_chunk(5, [pickle.dumps(42)], None, PICKLED))


def test_plain_tasks_skip_cloudpickle_and_still_pickle_to_the_same_bytes() -> None:
    import math
    import types

    import cloudpickle

    from zdq.codec.tasks import TaskOptions, _plainly_picklable, dumps_task

    from .. import tasks

    for task in [(tasks.add, (1, 2)), (math.sqrt, (4.0,)), (tasks.add, (1,), {"b": 2}), (print, ("x", None, b"y"))]:
        assert _plainly_picklable(task), task
        assert dumps_task(task) == cloudpickle.dumps(task, protocol=5)
    in_main = types.FunctionType(tasks.add.__code__, {}, "in_main")
    in_main.__module__ = "__main__"
    for task in [
        (lambda x: x, (1,)),  # not importable
        (in_main, (1,)),  # a notebook's function: workers cannot import __main__
        (tasks.add, ([1], [2])),  # containers may hold anything
        (tasks.add, (1, 2), None, TaskOptions(retries=1)),
        (None, "item"),
    ]:
        assert not _plainly_picklable(task), task
        assert pickle.loads(dumps_task(task))[1] == task[1]
    cloudpickle.register_pickle_by_value(tasks)
    try:  # a module registered to travel by value goes through cloudpickle again
        assert not _plainly_picklable((tasks.add, (1, 2)))
    finally:
        cloudpickle.unregister_pickle_by_value(tasks)


def test_a_status_telling_more_consumers_than_any_broker_tells_is_refused() -> None:
    head = p.encode(p.QueueStatus(9, 0, 0, 0, 0, 0))[0]
    told = b"c" * 16 * p.MAX_CONSUMERS_TOLD
    assert len(p.decode([head, told]).consumer_digests) == p.MAX_CONSUMERS_TOLD  # type: ignore[union-attr,arg-type]
    with pytest.raises(ProtocolError, match="too many"):
        p.decode([head, told + b"c" * 16])


def test_a_consumers_digest_is_its_own_and_tells_nothing_of_its_identity() -> None:
    identity = b"\x07" * 16
    digest = p.consumer_digest(identity)
    assert len(digest) == 16 and digest == p.consumer_digest(bytes(identity)) != p.consumer_digest(b"\x08" * 16)
    assert identity not in digest
