"""Tasks of tests/test_async_clients.py (a module the workers import by name)."""


def fib(n: int) -> int:
    """The n-th Fibonacci number, computed the slow way (a little CPU per task)."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)
