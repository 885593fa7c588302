"""AdaIB's options measured (issue #15; docs/methods.md): effective β, the jointly trained g, gradient clipping.

1. ``beta``: β_eff = g/f (``compression="inverse"``, ``relevance_from="clean"``) for matched and shuffled
   pairs, f between normalised or raw embeddings, l2 and l1 — read from AdaIB's own scalars with ``steps=1``
   (f and g do not depend on the optimisation under these settings).
2. ``rules``: ``inverse`` / ``mlp`` / ``mlp_joint`` at the paper's settings (10 steps, 10 copies, clip 1.0):
   final g against eq. 13, KL, fit, the Spearman correlation of each map with ``inverse``'s, and the
   pre-clip gradient norm (``record_grad_norm``) with the fraction of updates the clip acted on.

Pairs: the synthetic shapes world (test split, seed 0) on ``clipib-shapes``, or random images with six
captions on a random-weight open_clip model (``--model ViT-B-32-quickgelu``). Shuffled = captions rolled by one.

    python benchmarks/adaib_options.py --model clipib-shapes --pairs 16
    python benchmarks/adaib_options.py --model ViT-B-32-quickgelu --pairs 4
"""

import argparse
from typing import Dict, List, Tuple

import torch
from torch import Tensor
from torchmetrics.functional import spearman_corrcoef

import clipib
from clipib.data.sources.base import ModelTransforms
from clipib.data.sources.synthetic.dataset import ShapesDataset

CAPTIONS = ["a photo of a dog", "two cats sleeping on a red sofa", "a man riding a horse on the beach",
            "a bowl of fruit", "a city street at night", "a small boat on a lake"]


def load_pairs(model: str, n: int) -> Tuple[clipib.SplitCLIP, Tensor, Tensor]:
    """The model and ``n`` (images, ids) pairs."""
    if model == "clipib-shapes":
        clip = clipib.load_clip(model)
        ds = ShapesDataset(n, seed=0, split="test")
        ds.use_transforms(ModelTransforms.from_clip(clip))
        items = [ds[i] for i in range(n)]
        return clip, torch.stack([it["image"] for it in items]), torch.stack([it["ids"] for it in items])
    torch.manual_seed(0)
    clip = clipib.load_clip(model, pretrained=None)
    images = torch.randn(n, 3, *clip.image_size, generator=torch.Generator().manual_seed(0))
    return clip, images, clip.tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(n)])


def fmt(t: Tensor) -> str:
    """``median [min, max]`` of a 1-d tensor."""
    return f"{t.median():.3g} [{t.min():.3g}, {t.max():.3g}]"


def beta_table(clip: clipib.SplitCLIP, images: Tensor, ids: Tensor) -> List[str]:
    rows = ["| pairs | f on | relevance | f | β_eff = g/f |", "|---|---|---|---|---|"]
    for pairs, caption_ids in (("matched", ids), ("shuffled", ids.roll(1, 0))):
        for emb in ("normalized", "raw"):
            for rel in ("l2", "l1"):
                s = clipib.AdaIB(clip, relevance=rel, embeddings=emb, steps=1, copies=1).attribute(
                    images, caption_ids).scalars
                torch.testing.assert_close(s["image_beta"], s["text_beta"])  # f(x, y) is symmetric: one β per pair
                rows.append(f"| {pairs} | {emb} | {rel} | {fmt(s['image_f'])} | {fmt(s['image_beta'])} |")
    return rows


def rules_table(clip: clipib.SplitCLIP, images: Tensor, ids: Tensor) -> List[str]:
    rows = ["| rule | modality | g / eq. 13 | KL | fit | ρ(map, inverse's) | grad norm mean | grad norm max | "
            "clipped |", "|---|---|---|---|---|---|---|---|---|"]
    seeds = list(range(images.shape[0]))
    out: Dict[str, clipib.Attribution] = {}
    for rule in ("inverse", "mlp", "mlp_joint"):
        out[rule] = clipib.AdaIB(clip, compression=rule, record_grad_norm=True).attribute(images, ids, seeds=seeds)
    for rule, attr in out.items():
        for mod, maps, ref in (("image", attr.image_grid, out["inverse"].image_grid),
                               ("text", attr.text_raw, out["inverse"].text_raw)):
            s = attr.scalars
            ratio = s[f"{mod}_g"] * (s[f"{mod}_f"] + 1e-3)
            valid = clip.text.span_mask(ids) if mod == "text" else torch.ones_like(maps.flatten(1), dtype=torch.bool)
            rho = torch.stack([spearman_corrcoef(a.flatten()[v.flatten()], b.flatten()[v.flatten()])
                               for a, b, v in zip(maps, ref, valid)])
            rows.append(f"| {rule} | {mod} | {fmt(ratio)} | {fmt(s[f'{mod}_kl'])} | {fmt(s[f'{mod}_fit'])} | "
                        f"{fmt(rho)} | {fmt(s[f'{mod}_grad_norm'])} | {fmt(s[f'{mod}_grad_norm_max'])} | "
                        f"{fmt(s[f'{mod}_clipped'])} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipib-shapes")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--only", choices=("beta", "rules"), default=None)
    args = parser.parse_args()
    clip, images, ids = load_pairs(args.model, args.pairs)
    print(f"model {args.model}, {args.pairs} pairs; cells: median [min, max] over pairs\n")
    if args.only in (None, "beta"):
        print("\n".join(beta_table(clip, images, ids)) + "\n")
    if args.only in (None, "rules"):
        print("\n".join(rules_table(clip, images, ids)))


if __name__ == "__main__":
    main()
