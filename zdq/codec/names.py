"""The rules every name a user gives zdq follows, checked once here: a pool's
(:func:`zdq.names.check_pool_name`) and a schedule's (:func:`zdq.codec.schedules.check_schedule_name`)
add their own to these.

A name is shown (``zdq status``, reprs, log lines, errors), typed back as an argument of the ``zdq``
command, and stored or sent in records that refuse what is too long: so it is printable (no
newline, no terminal escape), has no surrounding spaces, does not start with ``-`` (an option, to
the command), and has a length its records keep.

>>> check_name("nightly report", "a schedule's name", 200)
'nightly report'
"""

from __future__ import annotations

__all__ = ["check_name"]


def check_name(name: object, what: str, limit: int, *, in_bytes: bool = False, when_empty: str = "") -> str:
    """``name`` if it follows the rules of the module docstring and is at most ``limit`` characters
    (``in_bytes``: bytes in UTF-8); else raise saying which rule, the message starting with
    ``what`` (the argument, or whose name it is). ``when_empty`` is told after "must not be empty"
    (what to pass instead).

    Raises
    ------
    TypeError
        ``name`` is not a ``str``.
    ValueError
        It breaks a rule.
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__} {name!r:.80}")
    if not name:
        raise ValueError(f"{what} must not be empty" + (f" ({when_empty})" if when_empty else ""))
    if not name.isprintable() or name != name.strip():
        raise ValueError(f"{what} must be printable, without surrounding spaces, got {name!r:.80}")
    size = len(name.encode()) if in_bytes else len(name)
    if size > limit:
        unit = "bytes in UTF-8" if in_bytes else "characters"
        raise ValueError(f"{what} must be at most {limit} {unit}, got {size}: {name[:40]!r}...")
    if name.startswith("-"):
        raise ValueError(f"{what} must not start with '-' (the zdq command would read it as an option), got {name!r:.80}")
    return name
