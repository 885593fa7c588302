"""Extending clipib (docs/architecture.md): a metric and a data source written in this file — each the code a
new file would hold — plus one registry line, run through ``eval.py``'s CLI with a config that has no
``callbacks:`` or ``logger:`` block; the rerun resumes without decoding the finished samples."""

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import yaml
from PIL import Image
from torch import Tensor

from clipib.data.common import Row
from clipib.data.sources.rows import RowSource, Selection
from clipib.data.sources.tables import image_row
from clipib.lit.cli import eval_cli
from clipib.metrics import METRICS
from clipib.metrics.base import AttributionMetric


class MapPeak(AttributionMetric):
    """The throwaway metric: the peak of each image map (value ``peak``)."""

    VALUES = {"image": ("peak",)}

    def score(self, clip, batch, attr, modality) -> Dict[str, Tensor]:
        return {"peak": attr.image.flatten(1).amax(1)}


class NumberedPairs(RowSource):
    """The throwaway source: ``<root>/<i>.png`` captioned "a photo number <i>", for i < n; counts decodes."""

    decoded: List[str] = []

    def __init__(self, root: str, n: int, selection: Optional[Selection] = None) -> None:
        super().__init__(selection)
        self.root, self.n = root, n

    def read_rows(self) -> List[Row]:
        return [image_row(f"pair{i}", Path(self.root) / f"{i}.png", f"a photo number {i}") for i in range(self.n)]

    def __getitem__(self, index: int):
        item = super().__getitem__(index)
        NumberedPairs.decoded.append(item["key"])
        return item


def _run(tmp_path: Path, tiny_config: str, run: str, n: int) -> dict:
    config = {
        "trainer": {"default_root_dir": str(tmp_path / run), "accelerator": "cpu", "devices": 1,
                    "enable_progress_bar": False},
        "model": {"model": tiny_config, "pretrained": None, "methods": {"random": {}, "grad_cam": {}},
                  "seeds": [0, 1], "metrics": {"map_peak": {}, "similarity": {}}},
        "data": {"class_path": "clipib.data.EvalDataModule", "init_args": {"batch_size": 2, "dataset": {
            "class_path": f"{NumberedPairs.__module__}.NumberedPairs",
            "init_args": {"root": str(tmp_path / "images"), "n": n}}}},
    }
    path = tmp_path / f"{run}-{n}.yaml"
    path.write_text(yaml.safe_dump(config))
    NumberedPairs.decoded = []
    eval_cli(args=["test", "-c", str(path)])
    return json.loads((tmp_path / run / "summary.json").read_text())


@pytest.mark.filterwarnings("ignore")
def test_a_new_metric_and_source_run_through_eval_and_resume(tmp_path, tiny_config, monkeypatch, capsys):
    (tmp_path / "images").mkdir()
    for i in range(5):
        pixels = (np.random.default_rng(i).random((40, 48, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
    monkeypatch.setitem(METRICS, "map_peak", MapPeak)  # the one registry line

    first = _run(tmp_path, tiny_config, "run", n=3)
    assert sorted(NumberedPairs.decoded) == ["pair0", "pair1", "pair2"]
    for method in ("random", "grad_cam"):
        assert first[method]["peak"]["n"] == 3 and 0 < first[method]["peak"]["mean"] <= 1
    assert (tmp_path / "run" / "tensorboard").is_dir()  # the CLI's default logger
    assert len(list((tmp_path / "run" / "records").glob("rank0-000.jsonl"))) == 1  # the default RecordWriter

    resumed = _run(tmp_path, tiny_config, "run", n=5)  # the same run folder, two more pairs
    assert sorted(NumberedPairs.decoded) == ["pair3", "pair4"]  # finished pairs are not even decoded
    assert "resumed: 3 pairs" in capsys.readouterr().out
    new = [json.loads(line) for line in (tmp_path / "run" / "records" / "rank0-001.jsonl").read_text().splitlines()]
    assert sorted({r["key"] for r in new}) == ["pair3", "pair4"] and all("peak" in r for r in new)

    fresh = _run(tmp_path, tiny_config, "fresh", n=5)
    assert len(NumberedPairs.decoded) == 5
    for method in ("random", "grad_cam"):
        for value in ("peak", "cos"):
            assert resumed[method][value]["n"] == 5
            assert resumed[method][value]["mean"] == pytest.approx(fresh[method][value]["mean"], rel=1e-6)
            assert resumed[method][value]["std"] == pytest.approx(fresh[method][value]["std"], rel=1e-5, abs=1e-9)
