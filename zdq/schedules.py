"""Moved to :mod:`zdq.codec.schedules`; this path re-exports it for one release, then goes.

Every name below is the codec's own object (``zdq.schedules.Missed is
zdq.codec.schedules.Missed``). ``_missed`` is kept for :mod:`zdq.scheduling`, which reads it
here until its import moves. To monkeypatch a function, patch it where it lives now, in
:mod:`zdq.codec.schedules`.
"""

from __future__ import annotations

from zdq.codec.schedules import GRACE, SCHEDULED, Missed, ScheduleRecord, Spec, plan
from zdq.codec.schedules import _missed as _missed

__all__ = ["GRACE", "SCHEDULED", "Missed", "ScheduleRecord", "Spec", "plan"]
