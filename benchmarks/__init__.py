"""Benchmarks: throughput beside the reference trainer, full-size architectures, FLOP counts."""
