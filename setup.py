"""The compiled parts of zdq (everything else is in pyproject.toml), both optional: where no C
compiler is found, the build goes on without them and zdq does the same work in Python.

- ``zdq._untracked`` makes ``queue_pool.map``'s futures without the garbage collector walking them;
- ``zdq._calls`` checks a batch of calls in one pass (``batch_submit``, maps)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("zdq._untracked", ["zdq/_untracked.c"], optional=True),
        Extension("zdq._calls", ["zdq/_calls.c"], optional=True),
    ]
)
