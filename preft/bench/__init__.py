"""Benchmarks: the throughput of base vs multi-LoRA vs PreFT, measured side by side in one run (``preft bench``)."""
