"""Benchmarks and reference tooling (DESIGN.md §2): nothing here is needed to explain a pair.

- :mod:`~clipib.bench.throughput`: ``clipib bench``, pairs/s and peak memory against the reference loops;
- :mod:`~clipib.bench.flops`: the FLOP floor of M2IB and NIB;
- :mod:`~clipib.bench.cuda_checks`: checks of the CUDA path (``benchmarks/gpu_check.sh``);
- :mod:`~clipib.bench.reference_loops`: M2IB and NIB shaped like the official code, and :data:`REFERENCE_LOOPS`;
- :mod:`~clipib.bench.timing`: the one timer and the one Spearman ρ of clipib;
- :mod:`~clipib.bench.common`: synthetic pairs and machine info.

Import the submodule you need; this package imports nothing.
"""
