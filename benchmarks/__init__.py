"""Benchmarks of the fused SPPO loss against its peers (see docs/benchmark.md)."""
