"""Raises at import: a task named here fails with an ImportError naming this module."""

raise RuntimeError("boom at import of tests.named_broken.raises")
