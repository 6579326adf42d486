"""Where brokers bind, decided without sockets: Dask addresses of every kind, zdq.bind-host, the
settings (binding in port ranges, name resolution and IPv6 are in tests/test_addresses.py)."""

from __future__ import annotations

from typing import Any

import dask.config
import pytest

import zdq
from zdq.errors import AddressError
from zdq.transport import addresses
from zdq.transport.addresses import bind_address, host_of

KW: dict[str, Any] = {"bind_host": None, "default": "127.0.0.1"}


def test_tcp_and_tls_workers_bind_their_own_address_and_inproc_workers_the_default_host() -> None:
    assert bind_address("tcp://10.1.2.3:4000", "tcp://10.1.2.1:8786", **KW) == "10.1.2.3"
    assert bind_address("tls://10.1.2.3:4000", "tls://10.1.2.1:8786", **KW) == "10.1.2.3"
    assert bind_address("tcp://[fd00::5]:4000", None, **KW) == "fd00::5"
    assert bind_address("inproc://10.1.2.3/77/1", "inproc://10.1.2.3/77/0", **KW) == "127.0.0.1"
    assert bind_address(None, None, **KW) == "127.0.0.1"


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
