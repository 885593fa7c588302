"""Two CPU processes (gloo), each updating with part of the data, compute what one process computes.

One test covers every metric class of ``clipib.metrics``. The two ranks run this file as a script in fresh
processes (forking a process whose OpenMP pool is already running can deadlock).
The split is uneven (5 + 3 samples) so concatenated states (AUROC) are gathered with padding too.
"""
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

import clipib.metrics as M

N, H, W, L = 8, 8, 8, 10
SOT, EOT = 49406, 49407


def _data():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(N, H, W, generator=g)
    xy = torch.randint(0, 5, (N, 2), generator=g).float()
    boxes = torch.cat([xy, xy + 3], 1)
    boxes[1] = torch.tensor([0.0, 0.0, 8.0, 6.0])  # 75 % ROI: EHR skips it
    images = torch.randn(N, 3, H, W, generator=g)
    n_tok = torch.randint(2, 8, (N,), generator=g)
    ids = torch.zeros(N, L, dtype=torch.long)
    for i, n in enumerate(n_tok.tolist()):
        ids[i, 0], ids[i, 1 : n + 1], ids[i, n + 1] = SOT, torch.arange(100, 100 + n), EOT
    scores = torch.rand(N, L, generator=g)
    gold = torch.zeros(N, L, dtype=torch.bool)
    gold[:, 1] = True
    orig, pert = torch.rand(N, generator=g), torch.rand(N, generator=g)
    matched = torch.arange(N) % 2 == 0
    return dict(maps=maps, boxes=boxes, images=images, ids=ids, scores=scores, gold=gold,
                orig=orig, pert=pert, matched=matched)


def _image_score(x):
    return x.flatten(1).tanh().mean(1)


def _text_score(ids):
    return (ids % 7).double().mean(1)


def _metrics():
    return {
        "loc": M.LocalizationIoU(q=0.75), "pg_iou": M.PointingGameIoU(), "pg": M.PointingGame(tolerance=1),
        "ehr": M.EffectiveHeatRatio(), "del_img": M.InsertionDeletion("image", "deletion", steps=4),
        "ins_txt": M.InsertionDeletion("text", "insertion", steps=3), "auroc": M.MismatchAUROC(),
        "share": M.TopKGoldShare(k=2), "hit": M.TopKGoldHit(k=2),
        "drop": M.ConfidenceDrop(), "incr": M.ConfidenceIncrease(),
    }


def _run(sl):
    d = {k: v[sl] for k, v in _data().items()}
    ms = _metrics()
    for k in ("loc", "pg_iou", "pg", "ehr"):
        ms[k].update(d["maps"], d["boxes"])
    ms["del_img"].update(d["images"], d["maps"], _image_score)
    ms["ins_txt"].update(d["ids"], d["scores"], _text_score)
    ms["auroc"].update(d["orig"] - d["pert"], d["matched"])
    for k in ("share", "hit"):
        ms[k].update(d["scores"], d["gold"], d["ids"])
    for k in ("drop", "incr"):
        ms[k].update(d["orig"], d["pert"])
    out = {}
    for k, m in ms.items():
        out[k] = m.compute().double()
        if isinstance(m, M.SampleMeanMetric):
            out.update({f"{k}/{s}": v.double() for s, v in m.summary().items()})
        if isinstance(m, M.InsertionDeletion):
            out[f"{k}/curve"] = m.compute_curves()[1]
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
    assert single["ehr/skipped"].item() == 1 and single["ehr/n"].item() == N - 1


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
