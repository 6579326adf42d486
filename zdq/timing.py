"""Moved to :mod:`zdq.codec.timing`; this path re-exports it for one release, then goes.

Every name below is the codec's own object (``zdq.timing.Timing is zdq.codec.timing.Timing``).
To monkeypatch a function, patch it where it lives now, in :mod:`zdq.codec.timing`.
"""

from __future__ import annotations

from zdq.codec.timing import MAX_PRIORITY, MIN_PRIORITY, Timing, timing_of

__all__ = ["MAX_PRIORITY", "MIN_PRIORITY", "Timing", "timing_of"]
