"""Where brokers bind: Dask addresses of every kind, zdq.bind-host, zdq.ports (no cluster)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import dask.config
import pytest
import zmq

import zdq
from zdq.errors import AddressError
from zdq.transport import addresses
from zdq.transport.addresses import bind_address, host_of
from zdq.transport.sockets import bind_router, close_socket, connect_dealer

KW: dict[str, Any] = {"bind_host": None, "default": "127.0.0.1"}


def test_tcp_and_tls_workers_bind_their_own_address_and_inproc_workers_the_default_host() -> None:
    assert bind_address("tcp://10.1.2.3:4000", "tcp://10.1.2.1:8786", **KW) == "10.1.2.3"
    assert bind_address("tls://10.1.2.3:4000", "tls://10.1.2.1:8786", **KW) == "10.1.2.3"
    assert bind_address("tcp://[fd00::5]:4000", None, **KW) == "fd00::5"
    assert bind_address("inproc://10.1.2.3/77/1", "inproc://10.1.2.3/77/0", **KW) == "127.0.0.1"
    assert bind_address(None, None, **KW) == "127.0.0.1"


def test_host_names_resolve_with_getaddrinfo() -> None:
    expected = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)[0][4][0]
    assert bind_address("tcp://localhost:4000", "tcp://127.0.0.1:8786", **KW) == expected
    with pytest.raises(AddressError, match="does not resolve"):
        bind_address("tcp://no-such-host.invalid:4000", None, **KW)


def test_a_name_that_resolves_to_127_0_1_1_binds_the_interface_toward_a_remote_scheduler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Debian's /etc/hosts maps the machine's own name to 127.0.1.1: bound there, nobody else
    # would reach the broker.
    monkeypatch.setattr(addresses, "_resolve", lambda host, what: ["10.1.2.1"] if host == "sched" else ["127.0.1.1"])
    monkeypatch.setattr(addresses, "_source_toward", lambda host: "10.1.2.3")
    assert bind_address("tcp://node1:4000", "tcp://sched:8786", **KW) == "10.1.2.3"
    # A scheduler on this machine's loopback: loopback is right.
    monkeypatch.setattr(addresses, "_resolve", lambda host, what: ["127.0.1.1"])
    assert bind_address("tcp://node1:4000", "tcp://node1:8786", **KW) == "127.0.1.1"
    # An address given as such is taken as it is.
    assert bind_address("tcp://127.0.1.1:4000", "tcp://10.1.2.1:8786", **KW) == "127.0.1.1"


@pytest.mark.parametrize("scheme", ["ucx", "ws", "wss"])
def test_other_schemes_are_refused_with_the_scheme_named_unless_bind_host_says_where(scheme: str) -> None:
    with pytest.raises(AddressError, match=f"speaks {scheme}://.*zdq.bind-host"):
        bind_address(f"{scheme}://10.1.2.3:4000", None, **KW)
    assert bind_address(f"{scheme}://10.1.2.3:4000", None, bind_host="127.0.0.1", default="x") == "127.0.0.1"


def test_bind_host_takes_an_interface_name_an_address_or_a_host_name() -> None:
    assert bind_address("tcp://10.1.2.3:4000", None, bind_host="lo", default="x") == "127.0.0.1"
    assert bind_address("tcp://10.1.2.3:4000", None, bind_host="::1", default="x") == "::1"
    assert bind_address("tcp://10.1.2.3:4000", None, bind_host="localhost", default="x") in ("127.0.0.1", "::1")


def test_hosts_are_compared_as_written() -> None:
    assert host_of("tcp://10.1.2.3:4000") == "10.1.2.3"
    assert host_of("tls://[fd00::5]:4000") == "fd00::5"
    assert host_of("tcp://Node1:4000") == "node1"
    assert host_of(None) == "localhost"


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


def test_network_settings_are_read_from_dask_config_and_bad_values_name_the_setting() -> None:
    with dask.config.set({"zdq.ports": "40000-40999", "zdq.bind-host": "eth0", "zdq.connect-timeout": "3s"}):
        settings = zdq.settings()
    assert (settings.ports, settings.bind_host, settings.connect_timeout) == ((40000, 40999), "eth0", 3.0)
    assert zdq.settings().ports is None and zdq.settings().bind_host is None
    assert zdq.settings(ports=40000).ports == (40000, 40000)
    for bad in ("40999-40000", "0-10", "a-b", "1-2-3", 3.5):
        with dask.config.set({"zdq.ports": bad}), pytest.raises(ValueError, match="zdq.ports must be a port range"):
            zdq.settings()
    with pytest.raises(ValueError, match="zdq setting ports must be a port range"):
        zdq.settings(ports="70000")
    with dask.config.set({"zdq.bind-host": 5}), pytest.raises(ValueError, match="zdq.bind-host must be an interface"):
        zdq.settings()
    with dask.config.set({"zdq.connect-timeout": "soon"}), pytest.raises(ValueError, match="zdq.connect-timeout"):
        zdq.settings()
    with pytest.raises(ValueError, match="connect_timeout must be a positive duration"):
        zdq.settings(connect_timeout=0)


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
