"""Where brokers bind, with real sockets and name resolution: host names, port ranges, another
host's address, IPv6 (the decisions alone are in tests/unit/test_addresses.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

import zdq
from zdq.errors import AddressError
from zdq.transport.addresses import bind_address
from zdq.transport.sockets import bind_router, close_socket, connect_dealer

KW: dict[str, Any] = {"bind_host": None, "default": "127.0.0.1"}


def test_host_names_resolve_with_getaddrinfo() -> None:
    expected = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)[0][4][0]
    assert bind_address("tcp://localhost:4000", "tcp://127.0.0.1:8786", **KW) == expected
    with pytest.raises(AddressError, match="does not resolve"):
        bind_address("tcp://no-such-host.invalid:4000", None, **KW)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def _free_ports(n: int) -> tuple[int, int]:
    """``n`` consecutive ports free now (best effort)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            low = probe.getsockname()[1]
        if low + n - 1 > 65535:
            continue
        free = True
        for port in range(low, low + n):
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    free = False
        if free:
            return low, low + n - 1
    pytest.skip("no run of free ports")


def test_brokers_bind_in_the_port_range_and_say_when_it_is_exhausted(ctx: zmq.Context[Any]) -> None:
    low, high = _free_ports(2)
    bound = [bind_router(ctx, "127.0.0.1", max_message_size=1 << 20, ports=(low, high)) for _ in range(2)]
    try:
        assert sorted(int(endpoint.rsplit(":", 1)[1]) for _, endpoint, _ in bound) == [low, high]
        with pytest.raises(AddressError, match=f"no free port .* zdq.ports {low}-{high}: all 2 are in use"):
            bind_router(ctx, "127.0.0.1", max_message_size=1 << 20, ports=(low, high))
    finally:
        for sock, _, _ in bound:
            close_socket(sock)


def test_binding_an_address_of_another_host_says_to_set_bind_host(ctx: zmq.Context[Any]) -> None:
    with pytest.raises(AddressError, match="no address of this host.*zdq.bind-host"):
        bind_router(ctx, "10.255.255.1", max_message_size=1 << 20)


def test_a_broker_on_an_ipv6_address_is_reached_at_its_endpoint(ctx: zmq.Context[Any]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    router, endpoint, _ = bind_router(ctx, "::1", max_message_size=1 << 20)
    dealer = connect_dealer(ctx, endpoint, b"d" * 16)
    try:
        assert endpoint.startswith("tcp://[::1]:")
        dealer.send(b"ping")
        assert router.poll(5000) and router.recv_multipart()[1] == b"ping"
    finally:
        close_socket(dealer)
        close_socket(router)


@pytest.mark.cluster
def test_a_cluster_on_ipv6_runs_its_pools_over_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    from distributed import Client, LocalCluster

    from .tasks import add

    with LocalCluster(
        n_workers=1, threads_per_worker=1, host="[::1]", processes=True,
        dashboard_address=None, worker_dashboard_address=None,
    ) as cluster, Client(cluster) as client:
        with zdq.QueuePool(client, 1) as queue_pool, zdq.ConsumerPool(client, queue_pool) as consumers:
            assert queue_pool.endpoints[0].startswith("tcp://[::1]:")
            consumers.start()
            assert queue_pool.submit(add, 1, 2).result(timeout=30) == 3
