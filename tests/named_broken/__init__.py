"""Modules that the named-task tests submit by name and that do not import: each one fails (or
hangs) at import, on purpose. Nothing imports them but the consumers (and their child processes)
of those tests."""
