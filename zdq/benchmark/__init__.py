"""The benchmark runner behind ``zdq bench`` (see ``benchmarks/README.md``)."""

from zdq.benchmark.cases import format_table, run
from zdq.benchmark.results import BenchConfig, CaseResult
from zdq.benchmark.tasks import noop

__all__ = ["BenchConfig", "CaseResult", "format_table", "run", "noop"]
