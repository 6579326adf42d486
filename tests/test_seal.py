"""Payload seals (zdq.codec.seal) under threads and fork: no two seals of a pool share a nonce.

GCM must never see one nonce twice under one key; every driver and consumer of a pool seals with
its payload key, each under a salt of its own. (Pure code, but with threads and a fork: outside
the unit tier.)
"""

from __future__ import annotations

import os
import threading

from zdq.codec.seal import MAGIC, seal, unseal

KEY = b"k" * 32
SALT_END = len(MAGIC) + 16  # a seal: MAGIC, salt, counter (8 bytes), tag, data
NONCE_END = SALT_END + 8
DATA = bytes(range(256)) * 4  # large enough to be sealed with GCM


def test_each_seal_has_a_nonce_of_its_own_and_a_forked_child_seals_under_a_salt_of_its_own() -> None:
    first, second = seal(KEY, DATA), seal(KEY, DATA)
    assert first[:SALT_END] == second[:SALT_END] and first[SALT_END:NONCE_END] != second[SALT_END:NONCE_END]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its parent's salt and counter would repeat nonces under one key
        code = 1
        try:
            os.write(write, seal(KEY, DATA))
            code = 0
        finally:
            os._exit(code)  # never back into pytest: whatever happened, the child ends here
    os.close(write)  # the child's end alone: a child that wrote nothing gives an empty read, not a wait
    _, status = os.waitpid(pid, 0)
    child = os.read(read, 4096)
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child could not seal"
    assert child[:SALT_END] != first[:SALT_END] and bytes(unseal(KEY, child)) == DATA


def test_threads_sealing_at_once_never_share_a_nonce() -> None:
    nonces: list[bytes] = []

    def seal_many() -> None:
        nonces.extend(seal(KEY, DATA)[:NONCE_END] for _ in range(2000))

    threads = [threading.Thread(target=seal_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(set(nonces)) == len(nonces) == 8000
