"""Two CPU processes (gloo) give the summary of one for the metrics that re-run the method (model
randomisation, other target, sensitivity, seed stability): the pattern of tests/test_metrics_ddp.py, each rank
scoring its part of the pairs (5 + 3) with the pairs' own seeds, as AttributionModule passes them."""
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
CAPTIONS = ["a red circle", "a dog", "a purple triangle", "look", "two cats", "a photo", "blue", "a tree"]
SETTINGS = {"model_randomisation": {"fractions": [0.0, 1.0]}, "other_target": {}, "sensitivity": {"samples": 2},
            "seed_stability": {"n_maps": 2}}


def _run(sl):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    clip = clipib.load_clip(TINY, pretrained=None)
    images = torch.randn(N, 3, *clip.image_size, generator=torch.Generator().manual_seed(0))[sl]
    ids, seeds = clip.tokenize(CAPTIONS)[sl], list(range(100, 100 + N))[sl]
    batch = {"image": images, "ids": ids}
    metrics = {name: M.METRICS[name](n_seeds=1, **s) for name, s in SETTINGS.items()}
    for name in ("saliency", "random"):
        method = clipib.METHODS[name](clip)
        attr = method.attribute(images, ids, "both", seeds=seeds)
        for metric in metrics.values():
            for mod in ("image", "text"):
                metric.update(clip, batch, attr, mod, method=method, seeds=seeds)
    out = {}
    for name, metric in metrics.items():
        for value, stats in metric.compute().items():
            out.update({f"{name}/{value}/{k}": v.double() for k, v in stats.items()})
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


@pytest.mark.slow  # three processes, ~30 s on the shared 2-core machine
def test_two_processes_equal_one(tmp_path):
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), port, str(tmp_path)]) for rank in (0, 1)]
    single = _run(slice(0, N))
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert single["sensitivity/image_max_sens/n"].item() == 2 * N  # two methods, every pair scored
    for rank in (0, 1):
        multi = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert multi.keys() == single.keys()
        for k, v in single.items():
            assert torch.allclose(multi[k], v, rtol=1e-6, atol=1e-9, equal_nan=True), (rank, k, multi[k], v)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
