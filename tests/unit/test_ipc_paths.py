"""Where a broker's Unix socket lives, decided without sockets: the private directory's checks,
the path from a TCP endpoint, and the cases that fall back to TCP before any probe (the probe, the
sweep and ipc on a real cluster are in tests/test_ipc.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zdq.transport import ipc
from zdq.transport.ipc import ipc_dir, ipc_endpoint, ipc_path


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


def test_a_directory_others_may_enter_or_a_symlink_is_not_used(base: Path) -> None:
    path = base / f"zdq-{os.getuid()}"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    assert ipc_dir(create=True) is None and ipc_dir(create=False) is None
    path.rmdir()
    elsewhere = base / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    path.symlink_to(elsewhere)
    assert ipc_dir(create=True) is None


def test_the_path_is_a_function_of_the_endpoint_and_fits_a_unix_socket(base: Path) -> None:
    directory = str(base)
    one = ipc_path(directory, "tcp://127.0.0.1:40001")
    assert one == ipc_path(directory, "tcp://127.0.0.1:40001")
    assert one != ipc_path(directory, "tcp://127.0.0.1:40002")
    assert one is not None and len(one.encode()) <= 100
    assert ipc_path("/" + "d" * 90, "tcp://127.0.0.1:40001") is None  # too long: TCP


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
