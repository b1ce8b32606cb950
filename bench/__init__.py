"""Benchmarks of the inventory pipeline: load generator, baselines and the report.

``python -m bench.run`` (``make bench``) runs everything and writes ``bench/REPORT.md``;
``python -m bench.loadgen --help`` drives a single load by hand. Nothing here is a test:
no timed assertions, only measurements written to a report.
"""
