"""The brokers' ZAP handler's verdict (pure): only the pool's CurveZMQ client key is admitted,
under its socket's own domain; anything else is refused with a 400 (issue 26, point 7: the lean
handler that replaced pyzmq's ThreadAuthenticator)."""

from __future__ import annotations

import os

from zdq.transport.security import zap_verdict

POOL_KEY, OTHER_KEY = os.urandom(32), os.urandom(32)
ADMITTED = {b"zdq-a": POOL_KEY}


def request(domain: bytes = b"zdq-a", mechanism: bytes = b"CURVE", key: bytes = POOL_KEY, version: bytes = b"1.0") -> list[bytes]:
    return [version, b"req-7", domain, b"127.0.0.1", b"", mechanism, key]


def test_the_pools_key_under_its_domain_is_admitted() -> None:
    reply = zap_verdict(request(), ADMITTED)
    assert reply[:3] == [b"1.0", b"req-7", b"200"] and len(reply) == 6


def test_another_key_domain_mechanism_or_version_is_refused() -> None:
    for bad in (
        request(key=OTHER_KEY),
        request(domain=b"zdq-b"),  # the key of another socket's pool
        request(mechanism=b"NULL"),
        request(mechanism=b"PLAIN"),
        request(version=b"2.0"),
        request()[:6],  # no credentials
        request() + [b"extra"],
    ):
        reply = zap_verdict(bad, ADMITTED)
        assert reply[2] == b"400" and reply[1] == b"req-7" and len(reply) == 6, bad


def test_a_malformed_request_is_still_answered() -> None:
    """A REP socket must answer every request, or it answers none after it."""
    assert zap_verdict([b"1.0"], ADMITTED)[2] == b"400"
    assert zap_verdict([], ADMITTED)[2] == b"400"
