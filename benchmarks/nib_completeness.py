"""How incomplete is NIB's 10-step right Riemann sum? (REFERENCE_NOTES §2; docs/methods.md)

For a few random pairs on a random-weight model (float64), compares Σ_t A_t of the paper's path
(λ = i/m, m = 10) and of a dense log-spaced trapezoid path with the target cos(f(h)) − cos(f(0)).

    python benchmarks/nib_completeness.py --model ViT-B-32-quickgelu --pairs 4
"""

import argparse
import json

import torch

import clipib

CAPTIONS = ["a photo of a dog", "two cats sleeping on a red sofa", "a man riding a horse on the beach",
            "a bowl of fruit", "a city street at night", "a small boat on a lake"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32-quickgelu")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--dense-steps", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    clip = clipib.load_clip(args.model, pretrained=None).double()
    images = torch.randn(args.pairs, 3, *clip.image_size, generator=torch.Generator().manual_seed(0)).double()
    ids = clip.tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(args.pairs)])
    rows = []
    for i in range(args.pairs):
        x_img, x_ids = images[i : i + 1], ids[i : i + 1]
        with torch.no_grad():
            e_img, e_txt = clip.image.encode(x_img), clip.text.encode(x_ids)
        for modality, tower, x, target in (("image", clip.image, x_img, e_txt), ("text", clip.text, x_ids, e_img)):
            paper = clipib.NIB(clip, steps=10)
            dense = clipib.NIB(clip, steps=args.dense_steps, path="log", internal_batch_size=50)
            k = paper.layer_for(tower)
            with torch.no_grad():
                h = tower.prefix(x, k)
                gap = float((tower.suffix(h, k, x) * target).sum() - (tower.suffix(0 * h, k, x) * target).sum())
            rows.append({"pair": i, "modality": modality, "target_gap": gap,
                         "sum_paper_10_steps": float(paper.scores(tower, x, target).sum()),
                         "sum_dense_log": float(dense.scores(tower, x, target).sum())})
            print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
