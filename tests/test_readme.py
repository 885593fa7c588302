"""The README's code that claims to run does run: "Add a method in ten lines", and the images it references exist."""

import re
from pathlib import Path

import torch

import clipib

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _block(heading: str) -> str:
    section = README.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_add_a_method_in_ten_lines(monkeypatch):
    code = _block("Add a method in ten lines")
    body = [line for line in code.splitlines() if line.strip() and not line.startswith(("import", "clipib.", "attr ="))]
    assert len(body) <= 10, body  # the class itself
    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(clipib.METHODS, "grad_x_input", None)  # restored after the test
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    attr = scope["attr"]
    assert clipib.METHODS["grad_x_input"] is scope["GradTimesInput"]
    assert attr.image.shape == (1, *attr.inputs.images.shape[-2:]) and attr.text is None
    assert float(attr.image.max()) == 1.0 and float(attr.image.min()) == 0.0
    # the method's map is gradient x input: check one pixel's raw score against autograd by hand
    clip, x, ids = clipib.load_clip("clipib-shapes"), attr.inputs.images.clone().requires_grad_(True), attr.inputs.ids
    cos = (clip.image.encode(x) * clip.text.encode(ids)).sum()
    expected = (torch.autograd.grad(cos, x)[0] * x).sum(1)
    raw = scope["GradTimesInput"](clip).attribute(attr.inputs.images, ids, "image").image_grid
    assert torch.allclose(raw, torch.nn.functional.adaptive_avg_pool2d(expected[:, None], clip.grid)[:, 0], atol=1e-5)


def test_referenced_images_exist_and_are_small():
    for path in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        file = ROOT / path
        assert file.is_file(), path
        assert file.stat().st_size < 500_000, (path, file.stat().st_size)
