"""The one compiled part of zdq (everything else is in pyproject.toml): ``zdq._untracked``, which
makes ``queue_pool.map``'s futures without the garbage collector walking them. It is optional: where
no C compiler is found, the build goes on without it and zdq makes the same futures in Python."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("zdq._untracked", ["zdq/_untracked.c"], optional=True)])
