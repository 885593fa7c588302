"""The `clipib explain` command: outputs, and one clear line for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clipib.cli import main
SAMPLE = "src/clipib/assets/sample.png"
TINY = "tests/data/tiny-clip.json"  # the tiny model of conftest.py (fixture tiny_config), relative to the root


def _explain(tmp_path, image, text="a red circle", method="m2ib", extra=()):
    return main(["explain", "--image", str(image), "--text", text, "--method", method, "--model", TINY,
                 "--pretrained", "none", "--out", str(tmp_path / "out"), *extra])


def test_explain_writes_png_and_json(tmp_path):
    assert _explain(tmp_path, SAMPLE, method="nib") == 0
    saved = json.loads((tmp_path / "out" / "explanation.json").read_text())
    record = saved["pairs"][0]
    assert saved["method"] == "nib" and record["tokens"][1:4] == ["a", "red", "circle"]
    assert len(record["token_scores"]) == len(record["tokens"]) == 5
    assert np.array(record["grid_scores"]).shape == (4, 4)
    png = Image.open(tmp_path / "out" / "explanation.png")
    assert png.size[0] > 256 and png.size[1] > 128
    assert "<span" in (tmp_path / "out" / "explanation.html").read_text()


def test_real_cli_module(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "clipib", "explain", "--image", SAMPLE, "--text", "a blue square", "--model", TINY,
         "--pretrained", "none", "--method", "nib", "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "explanation.png").is_file() and (tmp_path / "explanation.json").is_file()


@pytest.mark.parametrize("case", ["missing", "not_an_image", "empty_caption", "bad_model"])
def test_bad_input_is_one_line(tmp_path, capsys, case):
    fake = tmp_path / "fake.jpg"
    fake.write_text("this is text, not a JPEG")
    args = {"missing": (tmp_path / "nope.png", "a cat", ()), "not_an_image": (fake, "a cat", ()),
            "empty_caption": (SAMPLE, "   ", ())}
    if case == "bad_model":
        code = main(["explain", "--image", SAMPLE, "--text", "x", "--model", "no-such", "--pretrained", "none"])
    else:
        image, text, extra = args[case]
        code = _explain(tmp_path, image, text, extra=extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("clipib: error:") and "\n" not in err, err


def test_long_caption_truncated_with_warning(tmp_path):
    with pytest.warns(UserWarning, match="truncated"):
        assert _explain(tmp_path, SAMPLE, "a red circle " * 40, method="nib") == 0
    record = json.loads((tmp_path / "out" / "explanation.json").read_text())["pairs"][0]
    assert len(record["tokens"]) == 77


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_image_modes(tmp_path, mode):
    rgb = Image.open(SAMPLE).convert("RGB").resize((40, 30))
    if mode == "I;16":
        arr = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        img = Image.fromarray(arr)
        assert img.mode.startswith("I;16") or img.mode == "I"
    else:
        img = rgb.convert(mode)
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    img.save(path)
    from clipib.cli import read_image

    loaded = read_image(str(path))
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    if mode == "I;16":  # 16-bit range rescaled, not clipped to white
        assert abs(np.asarray(loaded)[..., 0].astype(int) - np.asarray(rgb.convert("L"))).max() <= 1
    assert _explain(tmp_path, path, method="nib") == 0


def test_roar_without_maps_is_one_line(tmp_path, capsys):
    """`clipib roar` with neither stored maps nor --maps-config stops before any run, with one line."""
    code = main(["roar", "-c", "configs/roar/shapes.yaml", "--out", str(tmp_path / "sweep"), "--maps", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("clipib: error:") and "--maps-config" in err and "\n" not in err, err
    assert not (tmp_path / "sweep").exists()
