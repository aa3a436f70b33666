"""Benchmarks for meterwall (run ``python benchmarks/overhead.py``; see benchmarks/README.md)."""
