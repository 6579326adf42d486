"""Where a broker's Unix socket lives, decided without sockets: the private directory's checks,
the path from a TCP endpoint, and the cases that fall back to TCP before any probe (the probe, the
sweep and ipc on a real cluster are in tests/test_ipc.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from zdq.transport import ipc
from zdq.transport.ipc import ipc_dir, ipc_endpoint, ipc_path
from zdq.transport.reach import CHECK_IPC_PATH, CONNECTED_NO_ANSWER, DRIVER_HEARS_NOTHING, OPEN_BETWEEN_WORKERS, RESUME_THE_BROKER, describe, over_ipc


@pytest.fixture
def tmp_path(short_tmp_path: Path) -> Path:
    """Short paths here: a socket path in pytest's own directory can be too long for the kernel."""
    return short_tmp_path


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ZDQ_IPC_DIR", str(tmp_path))
    return tmp_path


def test_the_directory_is_made_private_and_only_a_broker_makes_it(base: Path) -> None:
    assert ipc_dir(create=False) is None  # a peer only looks
    made = ipc_dir(create=True)
    assert made == str(base / f"zdq-{os.getuid()}")
    assert os.stat(made).st_mode & 0o777 == 0o700
    assert ipc_dir(create=False) == made


def test_a_directory_others_may_enter_or_a_symlink_is_not_used_and_the_warning_says_what_was_found(
    base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="zdq.transport.ipc")
    path = base / f"zdq-{os.getuid()}"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    assert ipc_dir(create=True) is None and ipc_dir(create=False) is None
    assert f"a directory of mode 0755 owned by uid {os.getuid()}" in caplog.text, caplog.text
    assert "mode 0700" in caplog.text  # and what is required
    path.rmdir()
    elsewhere = base / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    path.symlink_to(elsewhere)
    assert ipc_dir(create=True) is None
    assert "is a symlink of mode" in caplog.text, caplog.text


def test_a_relative_or_at_prefixed_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # ipc://@... is a Linux abstract socket to libzmq: no file, so no permission guards it.
    monkeypatch.chdir(tmp_path)
    for relative in ("@zdq-unit", "sockets-unit"):  # names of its own: each warning is said once a process
        monkeypatch.setenv("ZDQ_IPC_DIR", relative)
        assert ipc_dir(create=True) is None and ipc_dir(create=False) is None
        assert f"must be an absolute path, not {relative!r}" in caplog.text, caplog.text
    assert os.listdir(tmp_path) == []  # nothing made


def test_the_path_is_a_function_of_the_endpoint_and_fits_a_unix_socket(base: Path) -> None:
    directory = str(base)
    one = ipc_path(directory, "tcp://127.0.0.1:40001")
    assert one == ipc_path(directory, "tcp://127.0.0.1:40001")
    assert one != ipc_path(directory, "tcp://127.0.0.1:40002")
    assert one is not None and len(one.encode()) <= 100
    assert os.path.basename(one).startswith(ipc._prefix())  # this kernel's: the only files a sweep removes
    assert len(os.path.basename(one)) == 26


def test_a_path_too_long_for_a_unix_socket_says_once_that_tcp_is_used(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="zdq.transport.ipc")
    directory = "/" + "d" * 90 + "-unit-too-long"
    assert ipc_path(directory, "tcp://127.0.0.1:40001") is None  # too long: TCP
    assert ipc_path(directory, "tcp://127.0.0.1:40001") is None
    said = [r for r in caplog.records if "longer than a Unix socket's path" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO and "over TCP" in said[0].getMessage()


def test_no_file_a_plain_file_or_another_scheme_falls_back_to_tcp(base: Path) -> None:
    directory = ipc_dir(create=True)
    assert directory is not None
    endpoint = "tcp://127.0.0.1:40001"
    assert ipc_endpoint(endpoint) is None  # no broker of this host bound it
    path = ipc_path(directory, endpoint)
    assert path is not None
    Path(path).write_bytes(b"")
    assert ipc_endpoint(endpoint) is None  # not a socket
    assert ipc_endpoint("inproc://zdq-broker-1") is None


def test_no_ipc_where_the_platform_has_no_unix_sockets(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipc.os, "name", "nt")
    assert ipc_dir(create=True) is None


def test_an_unreachable_report_over_ipc_names_the_path_and_advises_checking_it_not_opening_ports() -> None:
    why = over_ipc("ipc:///run/zdq-1/b-x", "tcp://10.0.0.1:4000", "the CurveZMQ handshake failed")
    assert "ipc:///run/zdq-1/b-x (not tcp://10.0.0.1:4000)" in why and "listen at /run/zdq-1/b-x?" in why
    only_ipc = describe("pool p", [("q", "tcp://10.0.0.1:4000", "w", why)], OPEN_BETWEEN_WORKERS)
    assert only_ipc.endswith(CHECK_IPC_PATH)
    mixed = describe("pool p", [("q", "e", "w", why), ("r", "e2", "w", "refused")], OPEN_BETWEEN_WORKERS)
    assert mixed.endswith(OPEN_BETWEEN_WORKERS)  # some went over TCP: its ports matter


def test_a_connection_that_never_shook_hands_over_ipc_is_as_likely_a_stopped_broker_as_another_listener() -> None:
    """The kernel accepts a Unix-socket connection for a stopped process: a handshake that never
    completed does not say a foreign process holds the path."""
    why = over_ipc("ipc:///run/zdq-1/b-x", "tcp://10.0.0.1:4000", "the handshake never completed")
    assert "stopped or too busy, or another process listens at /run/zdq-1/b-x" in why, why
    assert over_ipc("ipc:///p", "tcp://h:1", "every connection attempt failed at once").endswith("failed at once")


def test_brokers_the_driver_does_not_hear_either_are_said_to_be_stopped_whatever_the_path_or_port() -> None:
    ipc_why = over_ipc("ipc:///run/zdq-1/b-x", "tcp://h:1", "the handshake never completed")
    unheard = f"; {DRIVER_HEARS_NOTHING} for 12 s"
    both = [("q", "e", "w", ipc_why + unheard), ("r", "e2", "w", "no route to that host" + unheard)]
    assert describe("pool p", both, OPEN_BETWEEN_WORKERS).endswith(RESUME_THE_BROKER)
    one = [("q", "e", "w", ipc_why + unheard), ("r", "e2", "w", ipc_why)]  # the driver hears r: its path may be held
    assert describe("pool p", one, OPEN_BETWEEN_WORKERS).endswith(CHECK_IPC_PATH)


def test_brokers_reached_over_tcp_that_never_shook_hands_are_not_blamed_on_closed_ports() -> None:
    """Reviewer 9: a stopped broker reached over TCP, before the driver's silence tells, got the
    advice to open ports, though each connection was made."""
    made = "a TCP connection was made, but the handshake never completed"
    lines = [("q", "tcp://h:1", "w", f"C-0 on x: {made}"), ("r", "tcp://h:2", "w", f"C-1 on x: {made}")]
    assert describe("pool p", lines, OPEN_BETWEEN_WORKERS).endswith(CONNECTED_NO_ANSWER)
    refused = ("s", "tcp://h:3", "w", "C-0 on x: every TCP connection attempt failed at once: refused")
    assert describe("pool p", [*lines, refused], OPEN_BETWEEN_WORKERS).endswith(OPEN_BETWEEN_WORKERS)
