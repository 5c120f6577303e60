"""Benchmarks: facade vs raw I/O, exchange throughput, operators vs peers."""
