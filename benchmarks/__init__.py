"""Benchmarks: see benchmarks/run.py."""
