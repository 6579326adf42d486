"""What zdq.result, zdq.state and ``zdq result`` accept as a key and a timeout: refused before
any cluster is asked."""

from __future__ import annotations

import math

import numpy as np
import pytest

import zdq
from zdq.client.by_id import task_key


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -1, -0.5, "5", True])
def test_a_timeout_is_none_or_a_finite_number_of_seconds(timeout: object) -> None:
    with pytest.raises(ValueError, match="timeout must be None or a finite number"):
        zdq.result("mails", 1, timeout=timeout)  # type: ignore[arg-type]


def test_a_key_is_an_int_a_numpy_int_or_a_string_of_digits() -> None:
    big = 1_900_000_000_000_000_123  # past 2**53: JSON numbers would round it
    assert task_key(big) == big and task_key(str(big)) == big and task_key(f" {big}\n") == big
    assert task_key(np.uint64(big)) == big and type(task_key(np.int64(7))) is int
    for bad in ("12ab", "-3", "1e18", "", "١٢"):
        with pytest.raises(ValueError, match="string of its digits"):
            task_key(bad)
    for bad in (True, 1.0, None, float(big)):
        with pytest.raises(TypeError, match="a task's key is an int"):
            task_key(bad)
