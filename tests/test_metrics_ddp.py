"""Two CPU processes (gloo), each updating with part of the data, compute what one process computes.

One test covers every eval metric of ``clipib.metrics.METRICS`` (two seeds each), ``MismatchAUROC`` and
``Throughput``. The two ranks run this file as a script in fresh processes (forking a process whose OpenMP
pool is already running can deadlock). The split is uneven (5 + 3 samples) so concatenated states (AUROC)
are gathered with padding too.
"""
import socket
import subprocess
import sys
from pathlib import Path

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
            "faithfulness_correlation": {"n_subsets": 4, "fill": "road", "road_iters": 3, "chunk": 3}}


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
    out = {}
    for name, metric in metrics.items():
        for value, stats in metric.compute().items():
            out.update({f"{name}/{value}/{k}": v.double() for k, v in stats.items()})
    out.update({f"auroc/{k}": v.double() for k, v in auroc.compute().items()})
    out.update({f"speed/{k}": v.double() for k, v in speed.compute().items()})
    return out


def _worker(rank, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(_run(slice(0, 5) if rank == 0 else slice(5, N)), f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    single = _run(slice(0, N))
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), port, str(tmp_path)]) for rank in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    for rank in (0, 1):
        multi = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert multi.keys() == single.keys()
        for k, v in single.items():
            assert torch.allclose(multi[k], v, atol=1e-9, equal_nan=True), (rank, k, multi[k], v)
    assert single["ehr/ehr/skipped"].item() == 1 and single["ehr/ehr/n"].item() == N - 1
    assert single["text_topk/topk_hit/skipped"].item() == 1
    assert single["localization/iou/std_over_seeds"].item() == 1.0 and single["auroc/n"].item() == N
    assert single["speed/pairs"].item() == N and "similarity/cos/mean" in single
    assert single["faithfulness_correlation/image_faith_corr/n"].item() == N  # ROAD noise seeded by key


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
