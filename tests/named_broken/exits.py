"""Exits at import (SystemExit): a task named here fails with an ImportError, the consumer lives on."""

raise SystemExit("exit at import of tests.named_broken.exits")
