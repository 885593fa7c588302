"""Throughput of every registered method against the reference-shaped loops (issue 7); same as ``clipib bench``.

    python benchmarks/throughput.py --batch-sizes 1 8 32 --threads 2 --out outputs/bench/throughput.json

Logic in :mod:`clipib.bench.throughput`; see ``docs/benchmarks.md`` for a recorded run.
"""

import argparse

from clipib.bench.throughput import add_arguments, run_from_args

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run_from_args(parser.parse_args())
