"""Configuration through ``dask.config`` under the ``zdq`` namespace.

Defaults live in ``zdq.yaml`` beside this module; users override them as with any Dask setting
(``dask.config.set({"zdq.chunk-size": 500})``, a YAML file, or ``DASK_ZDQ__CHUNK_SIZE``), and every
public constructor takes keyword-only overrides on top.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from typing import Any

import dask.config
import yaml
from dask.utils import parse_bytes, parse_timedelta

__all__ = ["PoolSettings", "settings", "get", "flag", "seconds_or_none"]

_defaults_path = os.path.join(os.path.dirname(__file__), "zdq.yaml")
with open(_defaults_path, encoding="utf-8") as _f:
    _DEFAULTS: dict[str, Any] = yaml.safe_load(_f)
dask.config.update_defaults(_DEFAULTS)


def _shipped(key: str) -> Any:
    """The default zdq ships for ``zdq.<key>`` (``durable.sync`` style keys for nested ones)."""
    value: Any = _DEFAULTS["zdq"]
    for part in key.split("."):
        value = value[part]
    return value


def get(key: str) -> Any:
    """``dask.config.get("zdq." + key)``, falling back to zdq's shipped default.

    Test harnesses (``distributed.utils_test``, for one) snapshot ``dask.config`` before zdq is
    imported and restore that snapshot later, which drops the defaults zdq registered at import.
    """
    return dask.config.get(f"zdq.{key}", default=_shipped(key))


def default_dirpath() -> str:
    """Where a durable pool not given ``dirpath=`` keeps its queues when ``zdq.durable.dirpath``
    is not set either: ``<tempfile.gettempdir()>/zdq-<uid>``, one directory per user, made 0700
    by the broker that first opens a queue in it (:func:`zdq.storage.lmdb.private_dir`). Not
    ``/tmp`` itself: there every user's pools of one name would share a queue, and a user could
    prepare another's queue directory."""
    return os.path.join(tempfile.gettempdir(), f"zdq-{os.getuid()}")


def flag(key: str) -> bool:
    """The true-or-false setting ``zdq.<key>``; an environment variable's ``"true"``/``"false"``
    counts too. A ValueError names the setting when it is neither."""
    value = get(key)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    if not isinstance(value, bool):
        raise ValueError(f"zdq.{key} must be true or false, got {value!r:.80}")
    return value


def _seconds(value: Any) -> float:
    seconds = parse_timedelta(value, default="seconds")
    if seconds is None:
        raise ValueError("a duration is required, got None")
    return float(seconds)


def _to_seconds(value: Any, name: str, accepted: str) -> float:
    """Seconds from a number or a Dask time string; ``ValueError`` naming ``name`` and what is
    ``accepted`` otherwise (booleans included, which Python counts as numbers)."""
    try:
        if isinstance(value, bool):
            raise TypeError("a boolean is not a duration")
        seconds = float(value) if isinstance(value, (int, float)) else parse_timedelta(value, default="seconds")
        if seconds is None:
            raise TypeError("no duration")
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{name} must be {accepted}, got {value!r}") from e
    return float(seconds)


def seconds_or_none(value: Any, name: str) -> float | None:
    """A positive duration in seconds from a number or a Dask time string (``"5s"``, ``"2min"``);
    ``None`` stays ``None``. A bad value raises ``ValueError`` naming ``name``."""
    if value is None:
        return None
    seconds = _to_seconds(value, name, "a number of seconds or a time string like '5s'")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{name} must be a positive, finite duration, got {value!r}")
    return seconds


def timeout_or_none(value: Any, name: str = "timeout") -> float | None:
    """How long a call may wait: ``None`` (no bound), or seconds as a non-negative number or a
    Dask time string (``"5s"``). A bad value raises ``ValueError`` naming ``name``, at the call."""
    if value is None:
        return None
    seconds = _to_seconds(value, name, "a number of seconds, a time string like '5s', or None")
    if not seconds >= 0:  # NaN too
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return None if seconds == float("inf") else seconds


def answer_timeout(value: Any, name: str = "timeout") -> float:
    """How long a call waits for the answer of the pool's actors (its brokers, its consumers):
    seconds, positive and finite, from a number or a Dask time string (``"5s"``). Checked at the
    call, before anything is asked or changed: a bad value (``None`` too: such a wait always has a
    bound) raises ``ValueError`` naming ``name``."""
    if value is None:
        raise ValueError(f"{name} must be a positive number of seconds (the answer is waited for within it), got None")
    seconds = seconds_or_none(value, name)
    assert seconds is not None
    return seconds


def _ttl_or_none(value: Any) -> float | None:
    """``result_ttl``: seconds from a number, a Dask time string or a timedelta; None: off."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    return seconds_or_none(value, "result_ttl")


def _bytes(value: Any) -> int:
    return int(parse_bytes(value)) if isinstance(value, str) else int(value)


@dataclass(frozen=True)
class PoolSettings:
    """The knobs of one pool, resolved from ``dask.config`` plus explicit overrides."""

    chunk_size: int
    chunk_bytes: int
    window: int
    buffer_bytes: int
    prefetch: int
    fan_out: int
    heartbeat_interval: float
    heartbeat_timeout: float
    max_message_size: int
    crash_attempts: int
    default_host: str
    durable_sync: bool
    map_size: int
    connect_timeout: float = 10.0
    no_consumer_timeout: float = 30.0
    placement_timeout: float = 60.0
    bind_host: str | None = None
    ports: tuple[int, int] | None = None
    #: At most this many of a driver's tasks unfinished (submitted, no outcome yet): ``submit``
    #: blocks past it (``timeout=`` bounds the wait). None: no bound but the window's.
    max_pending: int | None = None
    #: Seconds a queue keeps a chunk's results after its driver acknowledged them, for
    #: :func:`zdq.result` and :func:`zdq.state` from any process (None: not kept, the default).
    result_ttl: float | None = None
    #: Most bytes of such results a queue keeps (the oldest go first beyond it).
    result_bytes: int = 64 << 20
    #: A durable pool's ``window`` when the pool is not given one (None: ``window``'s). Larger than
    #: a transient pool's: a durable broker confirms a round's chunks only once their commit is
    #: flushed, so a window of 16 left its group commits small (see :meth:`for_durable`).
    durable_window: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "chunk_size", "chunk_bytes", "window", "buffer_bytes", "prefetch", "max_message_size", "map_size",
            "crash_attempts", "fan_out", "result_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"zdq setting {name} must be at least 1, got {getattr(self, name)!r}")
        if self.chunk_size > 100_000:
            raise ValueError(f"zdq setting chunk_size is at most 100000, got {self.chunk_size}")
        if self.heartbeat_interval <= 0 or self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError(
                "zdq heartbeat-timeout must be longer than heartbeat-interval "
                f"(got {self.heartbeat_timeout}s and {self.heartbeat_interval}s)"
            )
        if self.connect_timeout <= 0:
            raise ValueError(f"zdq setting connect_timeout must be a positive duration, got {self.connect_timeout!r}")
        if self.placement_timeout <= 0:
            raise ValueError(f"zdq setting placement_timeout must be a positive duration, got {self.placement_timeout!r}")
        if self.no_consumer_timeout <= 0:
            raise ValueError(
                f"zdq setting no_consumer_timeout must be a positive duration, got {self.no_consumer_timeout!r}"
            )
        if self.ports is not None:
            _port_range(self.ports)
        if self.durable_window is not None and self.durable_window < 1:
            raise ValueError(f"zdq setting durable_window must be at least 1 (or None), got {self.durable_window!r}")
        if self.max_pending is not None and self.max_pending < 1:
            raise ValueError(f"zdq setting max_pending must be at least 1 (or None), got {self.max_pending!r}")

    def for_durable(self) -> PoolSettings:
        """These settings for a durable pool not given ``window=``: its window is
        ``durable_window``, when set.

        Why larger: a durable broker confirms the chunks of a round only once their commit is
        flushed, so each CONFIRM reaches the driver a flush later than a transient queue's, and a
        window of 16 chunks a broker kept too few chunks coming for each group commit. The bounds
        it raises are per broker: chunks sent and not yet confirmed (their bytes stay within
        ``buffer_bytes``, which is not changed), and what a driver sends again when that broker
        is lost (at most ``durable_window`` chunks, which a durable queue may have stored
        already: run twice, as at-least-once allows)."""
        if self.durable_window is None:
            return self
        return replace(self, window=self.durable_window)

    def with_overrides(self, **overrides: Any) -> PoolSettings:
        """Return a copy with the given fields replaced; ``None`` values are ignored."""
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(
                f"unknown zdq setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; the settings are "
                + ", ".join(f.name for f in fields(self))
            )
        for key, value in given.items():
            given[key] = _read(key, value, key)
        return replace(self, **given)


def _read(name: str, value: Any, label: str) -> Any:
    """``value`` of setting ``name`` read as its kind says; a bad one raises naming ``label``."""
    convert, expected = _KINDS[name]
    try:
        return convert(value)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"zdq setting {label} must be {expected}, got {value!r}") from e


def _configured(name: str, key: str) -> Any:
    """Setting ``name`` as ``zdq.<key>`` in ``dask.config`` holds it (errors name ``zdq.<key>``)."""
    return _read(name, get(key), f"zdq.{key}")


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an integer")
    return value


def _integer_or_none(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return _integer(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("not True or False")
    return value


def _host_or_none(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value.strip()


def _port_range(value: Any) -> tuple[int, int] | None:
    """``"40000-40999"`` (both ends included), one port, or a pair; ``None`` for any free port."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise TypeError("not a port range")
    if isinstance(value, int):
        low = high = value
    elif isinstance(value, str):
        parts = value.replace(" ", "").split("-")
        if len(parts) > 2:
            raise ValueError("not a port range")
        low, high = int(parts[0]), int(parts[-1])
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(type(v) is int for v in value):
        low, high = value
    else:
        raise TypeError("not a port range")
    if not 1 <= low <= high <= 65535:
        raise ValueError("ports run from 1 to 65535, the first no higher than the last")
    return low, high


_DURATION = (_seconds, "a duration (seconds, or a string like '30s')")
_SIZE = (_bytes, "a size in bytes (or a string like '64MiB')")
_INTEGER = (_integer, "a positive integer")
#: How each setting given as a keyword is read, and what it must be.
_KINDS: dict[str, tuple[Any, str]] = {
    "chunk_size": _INTEGER,
    "chunk_bytes": _SIZE,
    "window": _INTEGER,
    "buffer_bytes": _SIZE,
    "prefetch": _INTEGER,
    "fan_out": _INTEGER,
    "heartbeat_interval": _DURATION,
    "heartbeat_timeout": _DURATION,
    "max_message_size": _SIZE,
    "crash_attempts": _INTEGER,
    "default_host": (str, "a host name or address"),
    "durable_sync": (_flag, "True or False"),
    "map_size": _SIZE,
    "connect_timeout": _DURATION,
    "no_consumer_timeout": _DURATION,
    "placement_timeout": _DURATION,
    "bind_host": (_host_or_none, "an interface name (eth0), or an address or name of the worker's host, or None"),
    "max_pending": (_integer, "a positive integer (or None: no bound)"),
    "durable_window": (_integer_or_none, "a positive integer (or None: the window's)"),
    "result_ttl": (_ttl_or_none, "a duration (seconds, a string like '10min', a timedelta) or None"),
    "result_bytes": _SIZE,
    "ports": (_port_range, "a port range like '40000-40999' (both ends included), or None for any free port"),
}


def settings(**overrides: Any) -> PoolSettings:
    """Read the current ``zdq.*`` settings from ``dask.config`` and apply ``overrides``."""
    base = PoolSettings(
        chunk_size=int(get("chunk-size")),
        chunk_bytes=_bytes(get("chunk-bytes")),
        window=int(get("window")),
        buffer_bytes=_bytes(get("buffer-bytes")),
        prefetch=int(get("prefetch")),
        fan_out=int(get("fan-out")),
        heartbeat_interval=_seconds(get("heartbeat-interval")),
        heartbeat_timeout=_seconds(get("heartbeat-timeout")),
        max_message_size=_bytes(get("max-message-size")),
        crash_attempts=int(get("crash-attempts")),
        default_host=str(get("default-host")),
        durable_sync=bool(get("durable.sync")),
        map_size=_bytes(get("durable.map-size")),
        connect_timeout=_configured("connect_timeout", "connect-timeout"),
        no_consumer_timeout=_configured("no_consumer_timeout", "no-consumer-timeout"),
        placement_timeout=_configured("placement_timeout", "placement-timeout"),
        bind_host=_configured("bind_host", "bind-host"),
        ports=_configured("ports", "ports"),
        result_ttl=_configured("result_ttl", "result-ttl"),
        result_bytes=_configured("result_bytes", "result-bytes"),
        durable_window=_configured("durable_window", "durable.window"),
    )
    return base.with_overrides(**overrides)
