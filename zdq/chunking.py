"""Moved to :mod:`zdq.codec.chunking`; this path re-exports it for one release, then goes.

Every name below is the codec's own object (``zdq.chunking.Chunking is
zdq.codec.chunking.Chunking``). To monkeypatch a method, patch it where it lives now, in
:mod:`zdq.codec.chunking`.
"""

from __future__ import annotations

from zdq.codec.chunking import Chunking, Packed

__all__ = ["Chunking", "Packed"]
