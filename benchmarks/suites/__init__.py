"""Benchmark suites for ``benchmarks/bench.py``: one module per form (``chunked``, ``recurrent``, ``fft``,
``attention``, ``delta``), each with ``run(smoke: bool) -> list[dict]`` returning rows (see common.row)."""
