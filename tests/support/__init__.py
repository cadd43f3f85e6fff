"""Test helpers shared by the suites and the benchmarks (``from tests.support.X import …``)."""
