"""``compile=True`` (torch.compile of the suffix passes, issue 20) against eager on the tiny model.

Tolerance: compiled kernels fuse and reorder float32 sums, so results agree to rounding, not bit for bit:
raw scores within ``1e-4 × max|eager|`` (+ rtol 1e-3), normalised maps within 1e-3, scalars within 1e-5
(measured on this tiny model: raw ≤ 1.5e-7 relative to the map's max, normalised ≤ 3e-4, scalars ≤ 5e-7).
"""

import pytest
import torch

import clipib
from clipib.attribution.compiled import CompiledPasses, check_compile, compile_counts

SEEDS = [5, 6, 7, 8]
FAST = dict(steps=3, copies=3)


def _close(a: clipib.Attribution, b: clipib.Attribution) -> None:
    for raw, norm in (("image_grid", "image"), ("text_raw", "text")):
        x, y = getattr(a, raw), getattr(b, raw)
        if x is None:
            assert y is None
            continue
        torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-4 * float(x.abs().max()))
        torch.testing.assert_close(getattr(b, norm), getattr(a, norm), rtol=0, atol=1e-3)
    assert a.scalars.keys() == b.scalars.keys()
    for key in a.scalars:
        torch.testing.assert_close(b.scalars[key], a.scalars[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_equals_eager(tiny_clip, pairs):
    """M2IB (both towers: the compiled bottleneck step), AdaIB (the same graphs), NIB (both towers' suffix
    passes): compiled == eager."""
    images, ids = pairs
    before = compile_counts()
    cases = ((clipib.M2IB, FAST, "both"), (clipib.AdaIB, FAST, "both"), (clipib.NIB, {}, "both"))
    for cls, kwargs, modality in cases:
        eager = cls(tiny_clip, **kwargs).attribute(images, ids, modality=modality, seeds=SEEDS)
        compiled = cls(tiny_clip, compile=True, **kwargs).attribute(images, ids, modality=modality, seeds=SEEDS)
        _close(eager, compiled)
    graphs = compile_counts()["graphs"] - before["graphs"]
    assert graphs >= 4  # M2IB image + text step, NIB image + text pass: compiled, not silently eager
    again = compile_counts()
    clipib.M2IB(tiny_clip, compile=True, **FAST).attribute(images, ids, seeds=SEEDS)  # same shapes: no recompile
    assert compile_counts()["graphs"] == again["graphs"]


@pytest.mark.slow
def test_text_length_multiple_bounds_recompiles(tiny_clip, pairs, monkeypatch):
    """Two batches whose longest captions differ: a recompilation at the exact length, none when both round up
    to the same ``text_length_multiple``."""
    images, ids = pairs
    shorter = ids.clone()
    longest = int(tiny_clip.text.eot_positions(ids).argmax())
    shorter[longest] = ids[int(tiny_clip.text.eot_positions(ids).argmin())]  # the longest caption replaced
    assert tiny_clip.text.valid_length(shorter) < tiny_clip.text.valid_length(ids)
    counts = []
    for multiple in (1, 16):
        monkeypatch.setattr(tiny_clip.text, "length_multiple", multiple)
        method = clipib.M2IB(tiny_clip, compile=True, **FAST)
        method.attribute(images, ids, modality="text", seeds=SEEDS)
        before = compile_counts()["graphs"]
        method.attribute(images, shorter, modality="text", seeds=SEEDS)
        counts.append(compile_counts()["graphs"] - before)
    assert counts[0] >= 1 and counts[1] == 0, counts


def test_compile_needs_a_compiler(tiny_clip, monkeypatch):
    """Without a C++ compiler on the CPU, compile=True fails at construction with one clear line."""
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    for cls in (clipib.M2IB, clipib.AdaIB, clipib.NIB):
        with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
            cls(tiny_clip, compile=True)
    cls(tiny_clip, compile=False)  # eager needs none
    check_compile(torch.device("cuda"))  # Inductor's GPU kernels (Triton) need no host C++ compiler here


def test_compiled_passes_key_by_module_identity(tiny_clip):
    """One compiled callable per static arguments; modules by identity; copies start empty."""
    import copy

    seen = []
    passes = CompiledPasses(lambda tower, k, x: seen.append((tower, k)) or x)
    passes._compiled[(("module", id(tiny_clip.image)), 1)] = ((tiny_clip.image, 1), lambda x: x + 1)
    assert float(passes((tiny_clip.image, 1), torch.zeros(()))) == 1.0  # the stored callable was used
    assert copy.deepcopy(passes)._compiled == {}
