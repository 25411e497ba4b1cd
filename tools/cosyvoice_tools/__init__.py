"""Developer tooling: model generation, parity, benchmarks, profiling, load and hostile-load runs, the pytest
fixtures. Nothing the product runs imports it (`tests/test_layering.py`); the launcher is `cosyvoice_launcher`."""
