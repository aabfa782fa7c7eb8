"""Stage and chain benchmarks for t2mv: timings, peak memory and FLOP counts, written as JSON.

Run ``python -m benchmarks.run --help``. Nothing here runs at import.
"""

SCHEMA = "t2mv-benchmark/1"

__all__ = ["SCHEMA"]
