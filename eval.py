"""Dataset-scale attribution and evaluation: ``python eval.py test -c configs/eval/<name>.yaml``.

Writes ``<trainer.default_root_dir>/``: per-sample records (one file per rank, written as computed),
``summary.json`` / ``summary.md``, the resolved ``config.yaml``, the attribution store and TensorBoard events.
Re-running the same command resumes where it stopped. See README.md and docs/eval.md.
"""

import sys

from clipib.lit.cli import run_eval


def main() -> int:
    """Run the LightningCLI; a full disk or a permission error is one line and exit code 1."""
    return run_eval()


if __name__ == "__main__":
    sys.exit(main())
