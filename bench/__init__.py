"""Benchmarks: they measure and print JSON lines with their environment; tests only assert that
each still runs (at a tiny size). Run them with ``harness bench NAME`` (or ``make bench``)."""
