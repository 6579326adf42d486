"""The route tables of the loops (message type to handler), without sockets."""

from __future__ import annotations

import pytest

from zdq.transport import protocol as p


def test_a_route_table_calls_the_handler_of_the_message_type_and_knows_no_other() -> None:
    seen: list[tuple[str, int, str]] = []
    routes = p.Routes[str, str]().add(p.Fetch, lambda peer, msg, ctx: seen.append((peer, msg.credit, ctx)))
    handler = routes.table.get(type(p.Fetch(3)))
    assert handler is not None
    handler("peer", p.Fetch(3), "round")
    assert seen == [("peer", 3, "round")]
    assert routes.table.get(p.Bye) is None and routes.table.get(p.Done) is None


def test_a_message_type_cannot_have_two_routes() -> None:
    routes = p.Routes[str, None]().add(p.Bye, lambda peer, msg, ctx: None)
    with pytest.raises(ValueError, match="Bye has a route already"):
        routes.add(p.Bye, lambda peer, msg, ctx: None)
