"""Sanity and robustness metrics (metrics/map_similarity.py, randomisation.py, robustness.py): kernels against
hand-computed cases, the metrics on the tiny model (the user's model untouched, the random baseline
insensitive to weights and target, determinism), kernels that never leave the device, and the module path."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import clipib
from clipib.lit.attribution_module import AttributionModule
from clipib.metrics import METRICS, ModelRandomisation, OtherTarget, SeedStability, Sensitivity
from clipib.metrics.base import average_ranks
from clipib.metrics.map_similarity import spearman, ssim, topk_overlap
from clipib.metrics.randomisation import other_captions, randomise_tower_
from clipib.metrics.robustness import pixel_noise, relative_change

SEEDS = [11, 12, 13, 14]


@pytest.fixture(scope="module")
def batch(pairs):
    images, ids = pairs
    return {"image": images, "ids": ids, "key": [f"k{i}" for i in range(4)]}


def test_spearman_hand_computed():
    # no ties: 1 - 6·Σd² / (n(n²-1)) = 1 - 6·2/60
    assert spearman(torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([[10.0, 20, 40, 30]])).item() == pytest.approx(0.8)
    # ties share their mean rank: ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4) -> 4.5 / sqrt(4.5 · 5)
    got = spearman(torch.tensor([[1.0, 1, 2, 3]]), torch.tensor([[1.0, 2, 3, 4]]))
    assert got.item() == pytest.approx(4.5 / math.sqrt(22.5))
    # the valid mask drops entries: only (1, 2, 3) vs (3, 2, 1) remain
    valid = torch.tensor([[True, True, True, False]])
    assert spearman(torch.tensor([[1.0, 2, 3, 9]]), torch.tensor([[3.0, 2, 1, 9]]), valid).item() == pytest.approx(-1)
    assert average_ranks(torch.tensor([[5.0, 7.0]]), torch.tensor([[False, True]])).tolist() == [[0.0, 1.0]]
    assert torch.isnan(spearman(torch.ones(1, 4), torch.rand(1, 4))).all()


def test_ssim_one_window_hand_computed():
    a = torch.arange(49.0).view(1, 7, 7) / 48
    b = 1 - a
    var = torch.arange(49.0).div(48).var(unbiased=True).item()  # sample variance, as scikit-image
    c1, c2 = 0.01**2, 0.03**2  # data range 1
    want = (2 * 0.25 + c1) * (-2 * var + c2) / ((0.5 + c1) * (2 * var + c2))
    assert ssim(a, b).item() == pytest.approx(want, rel=1e-9)
    assert ssim(a, a).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="7x7"):
        ssim(torch.rand(1, 4, 4), torch.rand(1, 4, 4))


def test_topk_relative_change_other_index_hand_computed():
    a = torch.tensor([[9.0, 8, 1, 0, 7], [1.0, 2, 3, 4, 5]])
    b = torch.tensor([[9.0, 0, 8, 1, 2], [5.0, 4, 3, 2, 1]])
    assert topk_overlap(a, b, 2).tolist() == [0.5, 0.0]
    assert relative_change(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]])).item() == pytest.approx(1.0)
    assert relative_change(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]]), relative=False).item() == 5.0
    pool, ids = torch.tensor([[7, 1], [8, 1]]), torch.tensor([[7, 1], [8, 1], [9, 1]])
    other, found = other_captions(pool, ids, [0, 1, 1])
    assert other.tolist() == [[8, 1], [7, 1], [8, 1]] and found.all()
    assert not other_captions(pool[:1].repeat(2, 1), ids[:1], [0])[1].any()  # only the own caption: not found
    noise = pixel_noise((2, 3, 4, 4), [5, 6], 0, radius=0.1, std=(0.5, 0.5, 0.5))
    assert noise.abs().max() <= 0.2 and torch.equal(noise[1], pixel_noise((1, 3, 4, 4), [6], 0, 0.1, std=(0.5,) * 3)[0])


def test_kernels_stay_on_the_device():
    """On ``meta`` tensors any ``.cpu()`` / ``.numpy()`` / ``.item()`` / ``.tolist()`` raises: the kernels run and
    return meta tensors, so a GPU batch never leaves the GPU inside them."""
    a, b = torch.empty(3, 16, device="meta"), torch.empty(3, 16, device="meta")
    valid = torch.ones(3, 16, dtype=torch.bool, device="meta")
    outs = [spearman(a, b, valid), ssim(torch.empty(3, 8, 8, device="meta"), torch.empty(3, 8, 8, device="meta")),
            topk_overlap(a, b, 4), relative_change(a, b)]
    assert all(o.device.type == "meta" and o.shape == (3,) for o in outs)


def test_registry_and_value_names():
    for name in ("model_randomisation", "other_target", "sensitivity", "seed_stability"):
        assert METRICS[name].needs_method
    m = ModelRandomisation(fractions=(1.0, 0.0))
    assert m.value_names("image") == ["image_mprt_rho_abs_000", "image_mprt_rho_000", "image_mprt_ssim_000",
                                      "image_mprt_topk_000", "image_mprt_rho_abs_100", "image_mprt_rho_100",
                                      "image_mprt_ssim_100", "image_mprt_topk_100"]
    assert m.value_names("text") == ["text_mprt_rho_abs_000", "text_mprt_rho_000", "text_mprt_rho_abs_100",
                                     "text_mprt_rho_100"]
    assert Sensitivity().value_names("text") == [] and SeedStability().value_names("text") == ["text_seed_rho"]
    with pytest.raises(ValueError, match="fractions"):
        ModelRandomisation(fractions=(1.5,))
    with pytest.raises(ValueError, match="method="):
        OtherTarget().update(None, {}, clipib.Attribution(), "image")


def test_randomisation_is_deterministic_per_part(tiny_clip):
    one, two = tiny_clip.copy(), tiny_clip.copy()
    assert randomise_tower_(one, "image", 2, seed=3) == 2
    randomise_tower_(two, "image", 2, seed=3, done=randomise_tower_(two, "image", 1, seed=3))  # a cascade
    for (name, p), q, orig in zip(one.named_parameters(), two.parameters(), tiny_clip.parameters()):
        assert torch.equal(p, q), name
        in_top = name.startswith("model.visual.transformer.resblocks.") and int(name.split(".")[4]) >= 1
        if p.ndim >= 2:  # matrices re-drawn in the projection and the top blocks only
            assert (not torch.equal(p, orig)) == (in_top or name == "model.visual.proj"), name
        elif in_top:  # norms and biases reset: ones / zeros
            assert torch.equal(p, torch.zeros_like(p) if name.endswith("bias") else torch.ones_like(p)), name
        else:
            assert torch.equal(p, orig), name


def test_user_model_untouched_and_random_insensitive(tiny_clip, batch):
    before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    method = clipib.METHODS["random"](tiny_clip)
    attr = method.attribute(batch["image"], batch["ids"], "both", seeds=SEEDS)
    for mod in ("image", "text"):
        for metric in (ModelRandomisation(fractions=(0.0, 1.0)), OtherTarget()):
            values = metric.update(tiny_clip, batch, attr, mod, method=method, seeds=SEEDS)
            assert values and all(torch.allclose(v, torch.ones_like(v)) for v in values.values()), (mod, values)
    assert all(torch.equal(before[k], v) for k, v in tiny_clip.state_dict().items())


def test_gradient_maps_change_with_weights_and_target(tiny_clip, batch):
    method = clipib.METHODS["saliency"](tiny_clip)
    attr = method.attribute(batch["image"], batch["ids"], "image")
    mprt = ModelRandomisation(fractions=(1.0,)).update(tiny_clip, batch, attr, "image", method=method)
    other = OtherTarget().update(tiny_clip, batch, attr, "image", method=method)
    assert mprt["image_mprt_rho_abs_100"].mean() < 0.9 and other["image_rl_rho_abs"].mean() < 0.99


def test_rebuild_keeps_settings(tiny_clip):
    m2ib = clipib.METHODS["m2ib"](tiny_clip, beta=0.5, steps=2)
    copy = tiny_clip.copy()
    twin = m2ib.rebuild(copy)
    assert twin.clip is copy and twin.beta == 0.5 and twin.bottleneck.steps == 2


def test_sensitivity_and_seed_stability(tiny_clip, batch):
    rnd, sal = clipib.METHODS["random"](tiny_clip), clipib.METHODS["saliency"](tiny_clip)
    a_rnd = rnd.attribute(batch["image"], batch["ids"], "image", seeds=SEEDS)
    a_sal = sal.attribute(batch["image"], batch["ids"], "image", seeds=SEEDS)
    sens = Sensitivity(samples=3, radius=0.1)
    assert torch.equal(sens.update(tiny_clip, batch, a_rnd, "image", method=rnd, seeds=SEEDS)["image_max_sens"],
                       torch.zeros(4))  # the same seed draws the same random map whatever the input
    s = sens.update(tiny_clip, batch, a_sal, "image", method=sal, seeds=SEEDS)
    chunked = Sensitivity(samples=3, radius=0.1, chunk=5).update(tiny_clip, batch, a_sal, "image", method=sal, seeds=SEEDS)
    assert (s["image_max_sens"] >= s["image_avg_sens"]).all() and (s["image_avg_sens"] > 0).all()
    assert torch.allclose(s["image_max_sens"], chunked["image_max_sens"], rtol=1e-4)
    stab = SeedStability(n_maps=3)
    assert torch.allclose(stab.update(tiny_clip, batch, a_sal, "image", method=sal, seeds=SEEDS)["image_seed_rho"],
                          torch.ones(4, dtype=torch.float64))
    assert stab.update(tiny_clip, batch, a_rnd, "image", method=rnd, seeds=SEEDS)["image_seed_rho"].abs().mean() < 0.6


def test_module_passes_method_and_seeds(tiny_config, batch):
    module = AttributionModule(model=tiny_config, pretrained=None, methods={"random": {}},
                               metrics={"model_randomisation": {"fractions": [0.5]}, "seed_stability": {},
                                        "similarity": {}})
    out = module.test_step(batch, 0)
    rows = out["records"]
    assert len(rows) == 4 and all(r["image_mprt_rho_050"] == pytest.approx(1.0) for r in rows)
    assert all(r["text_seed_rho"] < 1 for r in rows) and "cos" in rows[0]
    assert module.summary()["random"]["image_mprt_rho_abs_050"]["mean"] == pytest.approx(1.0)


@pytest.mark.slow  # one eval.py process, ~15 s
def test_eval_cli_writes_randomisation_curves(tmp_path, tiny_config):
    """eval.py with model_randomisation and the RandomisationCurves callback: summary values, PNG, TensorBoard."""
    cfg = {"trainer": {"default_root_dir": str(tmp_path / "run"), "accelerator": "cpu", "devices": 1,
                       "callbacks": [{"class_path": "clipib.callbacks.sanity.RandomisationCurves"}]},
           "model": {"model": tiny_config, "pretrained": "none", "methods": {"random": {}, "saliency": {}},
                     "metrics": {"model_randomisation": {"fractions": [0.0, 1.0]}, "sensitivity": {"samples": 2}}},
           "data": {"class_path": "clipib.data.EvalDataModule", "init_args": {
               "batch_size": 2, "dataset": {"class_path": "clipib.data.sources.synthetic.ShapesDataset",
                                            "init_args": {"size": 3, "seed": 0}}}}}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "eval.py"), "test", "-c", str(path)], capture_output=True,
                         text=True, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["random"]["text_mprt_rho_100"]["mean"] == pytest.approx(1.0)
    assert summary["saliency"]["image_max_sens"]["n"] == 3
    for method in ("random", "saliency"):
        assert Image.open(run / f"mprt_{method}.png").width > 400
    assert list(run.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("module", ["clipib.metrics.map_similarity", "clipib.metrics.randomisation",
                                    "clipib.metrics.robustness", "clipib.callbacks.sanity"])
def test_doctests(module):
    """The examples in the new modules' docstrings run (the suite collects tests/ only)."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
