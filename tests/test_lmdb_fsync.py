"""A new durable queue's directories are on disk before its first chunk is confirmed.

LMDB's ``sync``/``metasync`` flush ``data.mdb`` but never the directory entries that name it: a
power loss in the first seconds of a new queue could drop its directory with every chunk confirmed
so far. A power loss cannot be staged in a test; what it would undo can be watched: the storage runs
in a process of its own under ``strace``, on real files, and the trace must show an ``fsync`` of the
queue's directory, of every directory created for it and of the one that holds them, before the
process marks its first chunk confirmed.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults

_STORE_ONE_CHUNK = """
import os, sys
from zdq.storage import ChunkMeta, LMDBStorage

storage = LMDBStorage(sys.argv[1])
storage.open()
storage.put_many([(ChunkMeta(b"o" * 16, 1, 1), b"the first chunk")])  # returns once committed: confirmed
os.close(os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT, 0o644))  # the mark, seen in the trace
storage.close()
"""

#: ``fsync(3</some/dir>) = 0`` or ``fdatasync(...)``, as ``strace -y`` writes them (``-f``: a pid first).
_SYNC = re.compile(r"\b(fsync|fdatasync)\(\d+<(?P<path>[^>]*)>\)\s+=\s+0")


@functools.lru_cache(maxsize=None)
def _has_seccomp_bpf(strace: str) -> bool:
    probe = subprocess.run([strace, "-f", "--seccomp-bpf", "-qq", "-e", "trace=fsync", "true"], capture_output=True, timeout=60, check=False)
    return probe.returncode == 0 and b"seccomp" not in probe.stderr


def _trace(tmp_path: Path, queue: Path, mark: Path) -> list[str]:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace): the syscalls cannot be watched")
    out = tmp_path / "trace.txt"
    # --seccomp-bpf: the traced process stops only at the syscalls traced, not at each of the tens
    # of thousands its imports make (the trace is the same; the run takes half the time). An
    # strace without it (before 5.3) is run without.
    fast = ["--seccomp-bpf"] if _has_seccomp_bpf(strace) else []
    proc = subprocess.run(
        [strace, "-f", *fast, "-y", "-qq", "-e", "trace=openat,fsync,fdatasync", "-o", str(out),
         sys.executable, "-c", _STORE_ONE_CHUNK, str(queue), str(mark)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    if proc.returncode != 0 and "ptrace" in proc.stderr.lower():
        pytest.skip(f"strace cannot trace here (no ptrace permission): {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_text().splitlines()


def test_a_new_queues_directories_are_synced_before_its_first_chunk_is_confirmed(tmp_path: Path) -> None:
    base = Path(os.path.realpath(tmp_path))
    queue = base / "pools" / "durable" / "jobs-queue-0"  # pools/ and durable/ do not exist yet
    mark = base / "confirmed"
    lines = _trace(tmp_path, queue, mark)
    confirmed = next((i for i, line in enumerate(lines) if "openat(" in line and str(mark) in line), None)
    assert confirmed is not None, "the traced process never marked its chunk confirmed:\n" + "\n".join(lines[-20:])
    synced = [m.group("path") for line in lines[:confirmed] if (m := _SYNC.search(line))]
    # LMDB's own flush of the data file is in the trace: the trace sees the process's syncs.
    assert any(p.endswith("data.mdb") for p in synced), synced
    wanted = [queue, queue.parent, queue.parent.parent, base]  # the queue's, those made for it, their holder
    missing = [str(d) for d in wanted if str(d) not in synced]
    assert not missing, f"directories not fsynced before the first chunk was confirmed: {missing} (synced: {sorted(set(synced))})"


def test_an_existing_queue_is_synced_again_when_reopened(tmp_path: Path) -> None:
    # Its creator may have died between creating it and syncing its directories.
    base = Path(os.path.realpath(tmp_path))
    queue = base / "jobs-queue-0"
    # Made here, as the traced program makes it (only the reopening is traced).
    from zdq.storage import ChunkMeta, LMDBStorage

    first = LMDBStorage(str(queue))
    first.open()
    first.put_many([(ChunkMeta(b"o" * 16, 1, 1), b"the first chunk")])
    first.close()
    lines = _trace(tmp_path, queue, base / "again")
    synced = {m.group("path") for line in lines if (m := _SYNC.search(line))}
    assert {str(queue), str(base)} <= synced, synced
