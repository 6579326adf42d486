"""Addresses: which host a worker is on, and the address its brokers bind.

A broker binds one TCP port on its worker's host, on the address its peers reach that worker by
(never a wildcard), and reports ``tcp://<address>:<port>``. The address comes from, in order:

1. ``zdq.bind-host``: an interface name (``eth0``: its address), or an address or name of the host;
2. the worker's Dask address: ``tcp://`` and ``tls://`` workers bind their host (zdq runs TCP +
   CurveZMQ there whatever Dask's own transport), resolved with ``getaddrinfo`` (IPv6 and names
   work). A name that resolves to loopback only (Debian's ``127.0.1.1 <hostname>`` line in
   ``/etc/hosts``) on a worker whose scheduler is not on loopback binds the address of the
   interface the worker reaches its scheduler through: loopback would reach no one else;
3. ``default-host`` for workers with no network address (``inproc://``: a threaded LocalCluster).

Other schemes (``ucx://``, ``ws://``...) are refused with an :class:`~zdq.errors.AddressError`
naming the scheme, unless ``zdq.bind-host`` says where to bind.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from urllib.parse import urlsplit

from zdq.errors import AddressError

__all__ = ["host_of", "bind_address", "tcp_endpoint"]

logger = logging.getLogger(__name__)

#: Dask transports whose workers have a TCP host that zdq can bind on.
_TCP_SCHEMES = ("tcp", "tls")


def host_of(address: str | None) -> str:
    """The host part of a Dask address as written, not resolved (``tcp://10.0.0.5:40123`` ->
    ``10.0.0.5``): a worker's machine as the scheduler names it. Compare hosts only with this."""
    host = urlsplit(address).hostname if address else None
    return host or "localhost"


def tcp_endpoint(address: str, port: int) -> str:
    """``tcp://address:port``, with an IPv6 address in brackets."""
    return f"tcp://[{address}]:{port}" if ":" in address else f"tcp://{address}:{port}"


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _resolve(host: str, what: str) -> list[str]:
    """Every address of ``host``, in the order the system prefers them (getaddrinfo)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise AddressError(f"{what}: host name {host!r} does not resolve here ({e}); set zdq.bind-host") from e
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _interface_address(name: str) -> str | None:
    """The address of network interface ``name`` (IPv4 first), or None if there is no such interface."""
    import psutil

    found = psutil.net_if_addrs().get(name)
    if found is None:
        return None
    for family in (socket.AF_INET, socket.AF_INET6):
        for entry in found:
            if entry.family == family and not entry.address.startswith("fe80"):
                return str(entry.address)
    raise AddressError(f"zdq.bind-host names interface {name!r}, which has no IPv4 or global IPv6 address")


def _source_toward(host: str) -> str | None:
    """The address this host sends from to reach ``host``: the interface the routes choose (a
    UDP socket's connect sends nothing). None if there is no route."""
    try:
        target = _resolve(host, "the scheduler")[0]
        family = socket.AF_INET6 if ":" in target else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 9))
            return str(probe.getsockname()[0])
    except (OSError, AddressError):
        return None


def _configured(bind_host: str) -> str:
    address = _interface_address(bind_host)
    if address is not None:
        return address
    if _is_address(bind_host):
        return bind_host
    return _resolve(bind_host, "zdq.bind-host")[0]


def bind_address(worker: str | None, scheduler: str | None, *, bind_host: str | None, default: str) -> str:
    """The address the brokers of the worker at Dask address ``worker`` bind (see the module).

    Raises
    ------
    AddressError
        The worker's scheme has no TCP host (and no ``bind_host`` is set), or a name does not resolve.
    """
    if bind_host:
        return _configured(bind_host)
    if not worker:
        return default
    parts = urlsplit(worker)
    if parts.scheme == "inproc":
        return default
    if parts.scheme not in _TCP_SCHEMES:
        raise AddressError(
            f"worker {worker} speaks {parts.scheme}://, on which zdq cannot serve a queue: zdq's brokers bind "
            "TCP on the worker's host (Dask workers on tcp:// or tls://, or inproc:// in threads). Set "
            "zdq.bind-host to an interface or address of the workers' hosts to bind TCP there anyway."
        )
    host = parts.hostname
    if not host:
        return default
    if _is_address(host):
        return host
    addresses = _resolve(host, f"worker {worker}")
    if all(_is_loopback(a) for a in addresses) and scheduler and not _is_loopback_host(scheduler):
        toward = _source_toward(host_of(scheduler))
        if toward is not None and not _is_loopback(toward):
            logger.info(
                "worker %s: its host name resolves to %s here, but its scheduler %s is not on this host; "
                "binding %s, the interface toward the scheduler (set zdq.bind-host to choose)",
                worker, addresses[0], scheduler, toward,
            )
            return toward
    return addresses[0]


def _is_loopback_host(address: str) -> bool:
    """Whether Dask address ``address`` is on this host's loopback (or has no network host)."""
    parts = urlsplit(address)
    host = parts.hostname
    if parts.scheme == "inproc" or not host:
        return True
    try:
        return all(_is_loopback(a) for a in _resolve(host, address))
    except AddressError:
        return False
