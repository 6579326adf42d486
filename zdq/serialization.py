"""Moved to :mod:`zdq.codec.results`; this path re-exports it for one release, then goes.

Every name below is the codec's own object (``zdq.serialization.ErrorInfo is
zdq.codec.results.ErrorInfo``): ``isinstance`` checks and identity tests hold across both paths,
and results pickled before the move (``zdq.serialization.ErrorInfo``) still load. To monkeypatch
a function, patch it where it lives now, in :mod:`zdq.codec.results`.
"""

from __future__ import annotations

from zdq.codec.results import (
    PROTOCOL,
    UNKNOWN_BASE,
    ErrorInfo,
    all_scalars,
    check_picklable,
    dumps_results,
    error_to_exception,
    loads_results,
    seal,
    unseal,
)

__all__ = [  # noqa: RUF022 - grouped by role, as in zdq.codec.results
    "PROTOCOL",
    "UNKNOWN_BASE",
    # results
    "ErrorInfo",
    "dumps_results",
    "loads_results",
    "error_to_exception",
    # sealing
    "seal",
    "unseal",
    # what cannot be pickled
    "check_picklable",
    "all_scalars",
]
