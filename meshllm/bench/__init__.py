"""Benchmarks behind `meshllm bench`; each prints JSON."""
