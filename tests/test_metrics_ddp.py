"""Two CPU processes (gloo), each updating with part of the data, compute what one process computes.

One test covers every eval metric of ``clipib.metrics.METRICS`` that scores a given map (two seeds each),
``MismatchAUROC`` and ``Throughput``; another the metrics that re-run the method (model randomisation, other
target, sensitivity, seed stability), each rank scoring its pairs with the pairs' own seeds, as the
AttributionModule passes them. The two ranks run this file as a script in fresh processes (forking a process whose OpenMP
pool is already running can deadlock). The split is uneven (5 + 3 samples) so concatenated states (AUROC)
are gathered with padding too.
"""
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import clipib
import clipib.metrics as M

N = 8
TINY = str(Path(__file__).parent / "data" / "tiny-clip.json")
CAPTIONS = ["a red circle", "a dog", "there is a purple triangle in the picture", "look", "two cats on a mat",
            "a photo of a dog", "blue", "a small green square next to a tree"]
SETTINGS = {"confidence": {"protocol": "m2ib"}, "localization": {}, "pointing_game": {"tolerance": 1}, "ehr": {},
            "insertion_deletion": {"steps": 2}, "text_topk": {"k": 2}, "mismatch_scalars": {}, "similarity": {},
            "perturbation": {"steps": 2, "road_iters": 3, "chunk": 5}, "complexity": {}, "relevance_localization": {},
            "faithfulness_correlation": {"n_subsets": 4, "fill": "road", "road_iters": 3, "chunk": 3},
            "retrieval_roar": {"pool_size": 3, "image_fill": "road"}}
RERUN = {"model_randomisation": {"fractions": [0.0, 1.0]}, "other_target": {}, "sensitivity": {"samples": 2},
         "seed_stability": {"n_maps": 2}}


def _clip():
    torch.manual_seed(0)
    return clipib.load_clip(TINY, pretrained=None)


def _data(clip):
    g = torch.Generator().manual_seed(0)
    h, w = clip.image_size
    ids = clip.tokenize(CAPTIONS)
    span = clip.text.span_mask(ids)
    xy = torch.randint(0, h - 8, (N, 2), generator=g).float()
    boxes = torch.cat([xy, xy + 8], 1)
    boxes[1] = torch.tensor([0.0, 0.0, float(w), h * 0.75])  # 75 % ROI: EHR skips it
    gold = torch.zeros_like(ids, dtype=torch.bool)
    gold[:, 1] = True
    gold[3, 1] = False  # no gold token: text_topk skips it
    text_raw = torch.randn(ids.shape, generator=g) * span
    attr = clipib.Attribution(image=torch.rand(N, h, w, generator=g), image_grid=torch.randn(N, *clip.grid, generator=g),
                              text=text_raw.abs() / text_raw.abs().amax(1, keepdim=True), text_raw=text_raw)
    batch = {"image": torch.randn(N, 3, h, w, generator=g), "ids": ids, "box": boxes, "gold_tokens": gold,
             "matched": torch.arange(N) % 3 != 0, "key": [f"k{i}" for i in range(N)]}
    return batch, attr


def _take(batch, attr, sl):
    part = clipib.Attribution(image=attr.image[sl], image_grid=attr.image_grid[sl], text=attr.text[sl],
                              text_raw=attr.text_raw[sl])
    return {k: v[sl] for k, v in batch.items()}, part


def _run(sl):
    torch.set_num_threads(1)
    clip = _clip()
    batch, attr = _take(*_data(clip), sl)
    seeds = [attr, clipib.Attribution(image=attr.image.flip(-1), image_grid=-attr.image_grid,
                                      text=attr.text.flip(-1), text_raw=attr.text_raw.flip(-1))]
    metrics = {name: M.METRICS[name](n_seeds=2, **s) for name, s in SETTINGS.items()}
    auroc, speed = M.MismatchAUROC(orientation="matched_low", n_seeds=2), M.Throughput()
    for seed, a in enumerate(seeds):
        for metric in metrics.values():
            for mod in ("image", "text"):
                values = metric.update(clip, batch, a, mod, seed_index=seed)
                if "text_entropy" in values:
                    auroc.update(values["text_entropy"], batch["matched"], seed_index=seed)
    speed.update(pairs=sl.stop - sl.start, seconds=0.25 * (sl.stop - sl.start), peak_mib=float(sl.stop))
    out = _computed(metrics)
    out.update({f"auroc/{k}": v.double() for k, v in auroc.compute().items()})
    out.update({f"speed/{k}": v.double() for k, v in speed.compute().items()})
    return out


def _run_rerun(sl):
    """The re-running metrics on saliency's and random's maps of the pairs in ``sl``."""
    torch.set_num_threads(1)
    clip = _clip()
    images = torch.randn(N, 3, *clip.image_size, generator=torch.Generator().manual_seed(0))[sl]
    ids, seeds = clip.tokenize(CAPTIONS)[sl], list(range(100, 100 + N))[sl]
    batch = {"image": images, "ids": ids}
    metrics = {name: M.METRICS[name](n_seeds=1, **s) for name, s in RERUN.items()}
    for name in ("saliency", "random"):
        method = clipib.METHODS[name](clip)
        attr = method.attribute(images, ids, "both", seeds=seeds)
        for metric in metrics.values():
            for mod in ("image", "text"):
                metric.update(clip, batch, attr, mod, method=method, seeds=seeds)
    return _computed(metrics)


def _computed(metrics):
    return {f"{name}/{value}/{k}": v.double() for name, metric in metrics.items()
            for value, stats in metric.compute().items() for k, v in stats.items()}


RUNS = {"scored": _run, "rerun": _run_rerun}


def _two_processes(tmp_path, run: str, rtol: float = 1e-5):
    """``RUNS[run]`` on all pairs here, and on 5 + 3 pairs in two gloo processes; returns the single result."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, __file__, run, str(rank), port, str(tmp_path)]) for rank in (0, 1)]
    single = RUNS[run](slice(0, N))
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    for rank in (0, 1):
        multi = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert multi.keys() == single.keys()
        for k, v in single.items():
            assert torch.allclose(multi[k], v, rtol=rtol, atol=1e-9, equal_nan=True), (rank, k, multi[k], v)
    return single


def _worker(run, rank, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(RUNS[run](slice(0, 5) if rank == 0 else slice(5, N)), f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    single = _two_processes(tmp_path, "scored")
    assert single["ehr/ehr/skipped"].item() == 1 and single["ehr/ehr/n"].item() == N - 1
    assert single["text_topk/topk_hit/skipped"].item() == 1
    assert single["localization/iou/std_over_seeds"].item() == 1.0 and single["auroc/n"].item() == N
    assert single["speed/pairs"].item() == N and "similarity/cos/mean" in single
    assert single["faithfulness_correlation/image_faith_corr/n"].item() == N  # ROAD noise seeded by key
    assert single["retrieval_roar/roar_i2t_oc/n"].item() == 5  # the matched pairs, pooled by key: 3 + 2


@pytest.mark.slow  # three processes re-running two methods, ~30 s on the shared 2-core machine
def test_two_processes_equal_one_for_metrics_that_rerun_the_method(tmp_path):
    single = _two_processes(tmp_path, "rerun", rtol=1e-6)
    assert single["sensitivity/image_max_sens/n"].item() == 2 * N  # two methods, every pair scored


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
