"""The relay's cipher (zdq.relay.cipher): keys agreed, batches sealed one way, nothing else opens."""

from __future__ import annotations

import msgpack
import pytest

from zdq.errors import ProtocolError
from zdq.relay.cipher import (
    KeyOffer,
    RelaySession,
    ReplayedBatch,
    Side,
    pack_pull,
    pack_push,
    unpack_pull,
    unpack_push,
)

MARKER = b"ZDQ-SECRET-0123456789abcdef"


def _pair(secret: bytes | None = b"pool-secret", pool: str = "p", relay_pool: str | None = None) -> tuple[RelaySession, RelaySession]:
    """A driver's session and its relay's, agreed as RelayPath and Relay.hello agree them."""
    driver, relay = KeyOffer(), KeyOffer()
    d = driver.agree(relay.public, Side.DRIVER, pool=pool, identity=b"id", pool_secret=secret)
    r = relay.agree(driver.public, Side.RELAY, pool=relay_pool or pool, identity=b"id", pool_secret=secret)
    return d, r


def test_a_batch_sealed_by_one_side_opens_at_the_other_in_both_directions_and_hides_its_bytes() -> None:
    driver, relay = _pair()
    for n in range(3):
        sealed = driver.seal(MARKER + bytes([n]))
        assert MARKER not in sealed
        assert relay.open(sealed) == MARKER + bytes([n])
        back = relay.seal(b"answer %d" % n)
        assert driver.open(back) == b"answer %d" % n


def test_without_a_pool_secret_keys_are_still_agreed_and_batches_still_sealed() -> None:
    driver, relay = _pair(secret=None)
    sealed = driver.seal(MARKER)
    assert MARKER not in sealed and relay.open(sealed) == MARKER


def test_a_tampered_batch_is_refused_and_the_next_intact_one_still_opens() -> None:
    driver, relay = _pair()
    sealed = bytearray(driver.seal(MARKER))
    sealed[-1] ^= 1
    with pytest.raises(ProtocolError, match="failed authentication"):
        relay.open(bytes(sealed))
    header_changed = bytearray(driver.seal(b"x"))
    header_changed[2] = 9  # the version byte
    with pytest.raises(ProtocolError, match="not a sealed relay batch"):
        relay.open(bytes(header_changed))


def test_a_replayed_batch_is_refused_as_a_replay_and_the_session_goes_on() -> None:
    driver, relay = _pair()
    first = driver.seal(b"one")
    assert relay.open(first) == b"one"
    with pytest.raises(ReplayedBatch, match="already taken"):
        relay.open(first)
    assert relay.open(driver.seal(b"two")) == b"two"


def test_a_batch_sealed_for_the_other_direction_is_refused() -> None:
    driver, relay = _pair()
    sealed = driver.seal(b"to the relay")
    with pytest.raises(ProtocolError, match="sealed by the driver came to the driver"):
        driver.open(sealed)  # reflected back to its sender
    reflected = relay.seal(b"to the driver")
    with pytest.raises(ProtocolError, match="sealed by the relay came to the relay"):
        relay.open(reflected)


def test_a_batch_after_a_gap_is_refused_as_lost_batches() -> None:
    driver, relay = _pair()
    driver.seal(b"lost on the way")
    with pytest.raises(ProtocolError, match="batches were lost"):
        relay.open(driver.seal(b"after it"))


def test_sessions_of_other_keys_or_another_pool_open_nothing() -> None:
    driver, _ = _pair()
    _, stranger = _pair()
    with pytest.raises(ProtocolError, match="failed authentication"):
        stranger.open(driver.seal(b"x"))
    d, r = _pair(pool="p", relay_pool="q")
    with pytest.raises(ProtocolError, match="failed authentication"):
        r.open(d.seal(b"x"))
    d, r = _pair(secret=b"one")
    _, other_secret = _pair(secret=b"two")
    with pytest.raises(ProtocolError, match="failed authentication"):
        other_secret.open(d.seal(b"x"))


def test_a_key_offer_makes_one_session_and_refuses_keys_that_are_not_x25519_public_keys() -> None:
    offer, peer = KeyOffer(), KeyOffer()
    assert "hidden" in repr(offer) and "hidden" in repr(offer.agree(peer.public, Side.DRIVER, pool="p", identity=b"i", pool_secret=None))
    with pytest.raises(ProtocolError, match="already made its session"):
        offer.agree(peer.public, Side.DRIVER, pool="p", identity=b"i", pool_secret=None)
    for bad in (b"short", "x" * 32, b"\0" * 32):  # the last: a low-order point, no shared secret
        with pytest.raises(ProtocolError, match="X25519"):
            KeyOffer().agree(bad, Side.RELAY, pool="p", identity=b"i", pool_secret=None)  # type: ignore[arg-type]


def test_what_is_not_a_sealed_batch_is_refused_naming_it() -> None:
    _, relay = _pair()
    for bad in (None, b"", b"ZR" + b"\0" * 10, "text" * 20):
        with pytest.raises(ProtocolError, match="sealed relay batch"):
            relay.open(bad)  # type: ignore[arg-type]


def test_pushes_and_pulls_pack_and_unpack_to_what_the_relay_and_the_tunnel_carry() -> None:
    items = [(0, (1, "tcp://127.0.0.1:5555")), (0, [b"\x01", MARKER]), (3, [b""])]
    assert unpack_push(pack_push(items)) == items
    entries = [(0, 1, [b"a", b"b"]), (2, 7, [MARKER])]
    assert unpack_pull(pack_pull(entries)) == entries
    assert unpack_push(pack_push([])) == [] and unpack_pull(pack_pull([])) == []


def test_malformed_pushes_and_pulls_are_protocol_errors() -> None:
    for bad in (b"\xc1", pack_pull([(0, 1, [b"a"])])[:-1], pack_push([]) + b"\x00"):
        with pytest.raises(ProtocolError, match="did not decode"):
            unpack_push(bad)
    with pytest.raises(ProtocolError, match="is a list"):
        unpack_pull(msgpack.packb(5))
    for entry in ([1], [0, 1, "endpoint", "extra"], "x"):
        with pytest.raises(ProtocolError, match="entries"):
            unpack_push(msgpack.packb([entry]))
    for entry in ([0, 1, ["text"]], [0, "1", [b"a"]], [0, 1], "x"):
        with pytest.raises(ProtocolError, match="entries"):
            unpack_pull(msgpack.packb([entry]))
