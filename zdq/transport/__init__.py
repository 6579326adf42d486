"""Sockets, addressing and the wire protocol of zdq."""
