"""Dataset-scale attribution and evaluation: ``python eval.py test -c configs/eval/<name>.yaml``.

Writes ``<trainer.default_root_dir>/``: per-sample records (one file per rank, written as computed),
``summary.json`` / ``summary.md``, the resolved ``config.yaml``, the attribution store and TensorBoard events.
Re-running the same command resumes where it stopped. See README.md and docs/eval.md.
"""

from clipib.lit.cli import eval_cli


def main() -> None:
    """Run the LightningCLI."""
    eval_cli()


if __name__ == "__main__":
    main()
