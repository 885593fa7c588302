"""The "shapes" world: synthetic image-caption pairs with pixel- and token-level ground truth (issue 6).

A 64x64 RGB image holds 1-4 flat-coloured objects (4 shapes x 6 colours) on a noisy grey background; the
caption names one target object whose (colour, shape) is unique in the image. Ground truth per pair: the
target's pixel mask and box, its colour and shape words (and their token positions, given a tokenizer).
A mismatched pair keeps the image and names a (colour, shape) absent from it.

Sample ``i`` of a split is drawn from ``numpy.random.default_rng([seed, i])``: any index is reproducible
on its own, whatever the worker, batch or order. The match/mismatch decision and the mismatched caption
come from a separate stream ``[seed, i, 1]``, so the image of sample ``i`` never depends on them.

>>> s = generate_sample(seed=0, index=3)
>>> s.image.size, bool(s.mask.any()), s.matched
((64, 64), True, True)
>>> (s.colour, s.shape) in [(o.colour, o.shape) for o in s.objects]
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
TEMPLATES: tuple[str, ...] = (
    "a {c} {s}",
    "a photo of a {c} {s}",
    "there is a {c} {s} in the picture",
    "a picture showing a {c} {s}",
    "look at the {c} {s}",
)
PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)  # 24 (colour, shape)
PAIR_INDEX: dict[tuple[str, str], int] = {p: i for i, p in enumerate(PAIRS)}
BACKGROUND_RANGE = (170, 235)  # grey level v ~ U[170, 235], inclusive
NOISE_SIGMA = 6.0
SIDE_RANGE = (14, 24)  # box side in pixels, inclusive
MIN_GAP = 2  # background pixels between any two boxes (in x or in y)
MAX_OBJECTS = 4
_PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: colour and shape names and its box ``(x0, y0, x1, y1)``, x1/y1 exclusive."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]


@dataclass
class ShapesSample:
    """One image-caption pair of the shapes world with its ground truth.

    ``mask`` is the target's pixel mask ``[64, 64]`` (all False for a mismatched pair); ``box`` the
    target's box, xyxy with exclusive x1/y1 in image pixels (zeros for a mismatched pair); ``target`` the
    target's index in ``objects`` (-1 when mismatched); ``colour``/``shape`` the words the caption names.
    """

    key: str
    image: Image.Image
    caption: str
    colour: str
    shape: str
    matched: bool
    target: int
    mask: np.ndarray
    box: tuple[int, int, int, int]
    objects: list[ShapeObject] = field(default_factory=list)
    template: int = 0

    def present(self) -> np.ndarray:
        """Multi-hot ``[len(PAIRS)]`` of the (colour, shape) pairs present in the image."""
        out = np.zeros(len(PAIRS), dtype=bool)
        for o in self.objects:
            out[PAIR_INDEX[(o.colour, o.shape)]] = True
        return out


def _separated(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """True when boxes ``a`` and ``b`` (exclusive ends) have at least ``MIN_GAP`` pixels between them."""
    return (a[0] >= b[2] + MIN_GAP or b[0] >= a[2] + MIN_GAP
            or a[1] >= b[3] + MIN_GAP or b[1] >= a[3] + MIN_GAP)


def _place_boxes(rng: np.random.Generator, n: int) -> list[tuple[int, int, int, int]]:
    """Up to ``n`` square boxes fully inside the canvas, pairwise separated (fewer if space runs out)."""
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(_PLACEMENT_TRIES):
        if len(boxes) == n:
            break
        side = int(rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1))
        x0 = int(rng.integers(0, IMAGE_SIZE - side + 1))
        y0 = int(rng.integers(0, IMAGE_SIZE - side + 1))
        box = (x0, y0, x0 + side, y0 + side)
        if all(_separated(box, b) for b in boxes):
            boxes.append(box)
    return boxes


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: object) -> None:
    """Draw a filled ``shape`` in ``box`` (exclusive ends) with PIL: circle = ellipse in the box, square =
    the box, triangle = apex at top centre and base on the bottom edge, diamond = the edge midpoints."""
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1  # PIL corners are inclusive
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _sample_attributes(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """``n`` (colour, shape) pairs with at least one pair unique in the set."""
    while True:
        attrs = [PAIRS[int(k)] for k in rng.integers(0, len(PAIRS), size=n)]
        if any(attrs.count(a) == 1 for a in attrs):
            return attrs


def _layout(seed: int, index: int) -> tuple[np.ndarray, list[ShapeObject], int, int]:
    """Background ``[H, W, 3]``, objects, target index and template index of sample ``(seed, index)``."""
    rng = np.random.default_rng([seed, index])
    v = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
    noise = rng.normal(0.0, NOISE_SIGMA, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    canvas = np.clip(np.rint(v + noise), 0, 255).astype(np.uint8)  # [H, W, 3]
    boxes = _place_boxes(rng, int(rng.integers(1, MAX_OBJECTS + 1)))
    attrs = _sample_attributes(rng, len(boxes))
    objects = [ShapeObject(c, s, b) for (c, s), b in zip(attrs, boxes)]
    unique = [k for k, a in enumerate(attrs) if attrs.count(a) == 1]
    target = unique[int(rng.integers(0, len(unique)))]
    return canvas, objects, target, int(rng.integers(0, len(TEMPLATES)))


def _swap_target_shape(seed: int, index: int, objects: list[ShapeObject], target: int) -> list[ShapeObject]:
    """``objects`` with the target's shape replaced by one whose (colour, shape) is absent from the image
    (its colour instead, in the rare image that already holds all four shapes of the target's colour)."""
    held = {(o.colour, o.shape) for o in objects}
    colour, shape = objects[target].colour, objects[target].shape
    options = [(colour, s) for s in SHAPES if (colour, s) not in held]
    options = options or [(c, shape) for c in COLOURS if (c, shape) not in held]
    new = options[int(np.random.default_rng([seed, index, 2]).integers(0, len(options)))]
    out = list(objects)
    out[target] = ShapeObject(new[0], new[1], objects[target].box)
    return out


def generate_sample(seed: int, index: int, mismatch_rate: float = 0.0, split: str = "train",
                    minimal_pairs: bool = False) -> ShapesSample:
    """Generate sample ``index`` of the split with ``seed``; mismatched with probability ``mismatch_rate``.

    ``minimal_pairs`` (a training option, off by default): every odd index is the previous (even) sample
    with only its target's shape changed (to one whose (colour, shape) is absent, so the caption stays
    unique). A batch read in order then holds image pairs that a colour-only model cannot tell apart,
    which gives the contrastive loss a direct shape signal.
    """
    if not 0.0 <= mismatch_rate <= 1.0:
        raise ValueError(f"mismatch_rate must be in [0, 1], got {mismatch_rate}")
    if minimal_pairs and index % 2 == 1:
        canvas, objects, target, template = _layout(seed, index - 1)
        objects = _swap_target_shape(seed, index, objects, target)
    else:
        canvas, objects, target, template = _layout(seed, index)
    image = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(image)
    for o in objects:
        draw_shape(draw, o.shape, o.box, COLOURS[o.colour])
    attrs = [(o.colour, o.shape) for o in objects]

    side = np.random.default_rng([seed, index, 1])  # match decision: independent of the image stream
    matched = bool(side.random() >= mismatch_rate)
    if matched:
        colour, shape = attrs[target]
        mask_img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        draw_shape(ImageDraw.Draw(mask_img), shape, objects[target].box, 255)
        mask = np.asarray(mask_img) > 0  # [H, W]
        box = objects[target].box
    else:
        absent = [p for p in PAIRS if p not in set(attrs)]
        colour, shape = absent[int(side.integers(0, len(absent)))]
        target, mask, box = -1, np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool), (0, 0, 0, 0)
    return ShapesSample(
        key=f"shapes-{split}-{index}", image=image, caption=TEMPLATES[template].format(c=colour, s=shape),
        colour=colour, shape=shape, matched=matched, target=target, mask=mask, box=box,
        objects=objects, template=template,
    )
