"""Feature removal by attribution: which features to remove, and what a removed pixel or token becomes.

The one removal kernel of clipib, shared by the ROAR protocols (retrieval ROAR without retraining, AdaIB
App. F; ROAR+ fine-tuning, M2IB Sec. 4.4; the removal curve, InputIBA App. D.4) and the perturbation metrics.
Torch (and torchvision's Gaussian blur) only, vectorised over the batch: no Python loop over samples or
pixels, so it runs on the model's device or in data-loader workers alike. It imports nothing from
``clipib.metrics``, ``clipib.data`` or ``clipib.lit``; those import it.

Which features: :func:`top_fraction_mask` marks each sample's features above a per-sample percentile of its
map (``quantile=``: M2IB removes image pixels above the 75th percentile, ``0.75``, and tokens above the 50th;
AdaIB App. F tokens above the 90th) or its top ``fraction`` (the removal curve's 10 ... 90 %), optionally only
among ``valid`` features (a caption's content tokens, :func:`content_tokens`).

What they become:

* images, :func:`remove_image`: ``"mean"`` - each image's own per-channel mean (M2IB Fig. 3 / Sec. 4.4 and
  AdaIB App. F: "the image's mean channel values"); ``"blur"`` - InputIBA's Gaussian-blurred copy
  (:func:`blurred_canvas`); ``"road"`` - ROAD's noisy linear imputation (:func:`road_impute`, Rong et al.
  2022), which removes the leak of the mask's shape that a constant fill has; ``"black"`` or a number /
  per-channel numbers - a constant (:func:`deletion_fill`, normalised space).
* tokens, :func:`remove_tokens`: a stated blank id, default :data:`PAD_ID` (0), offer :data:`EOT_ID` (49407).

Deterministic noise: ROAD's noise for a sample comes from :func:`keyed_normal`, a counter-based hash of the
sample's seed and the element's index (:func:`key_seeds` turns sample keys into seeds), so a sample's
noise does not depend on its batch, the batch size, the process count or the device.
"""
from __future__ import annotations

import zlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur

__all__ = [
    "PAD_ID", "EOT_ID", "TIES", "IMAGE_FILLS", "top_fraction_mask", "content_tokens", "remove_image", "remove_tokens",
    "key_seeds", "keyed_normal", "road_impute", "image_fill", "blur_params", "blurred_canvas", "deletion_fill",
]

PAD_ID = 0
"""open_clip's padding id for CLIP's BPE (``"!"``): M2IB's blank token ``<B>`` ("the padding token", Table 1)."""
EOT_ID = 49407
"""CLIP's end-of-text id, the id AdaIB App. F writes as its "padding token"."""
TIES = ("rank", "threshold")
"""The tie rules of :func:`top_fraction_mask`."""


# --------------------------------------------------------------------------------------------------- which

def _row_quantile(x: Tensor, ok: Tensor, q: Tensor) -> Tensor:
    """Linear-interpolation quantile ``q [B]`` (NumPy's default, as ``np.percentile``) of each row's ``ok`` values."""
    srt = x.masked_fill(~ok, torch.inf).sort(dim=1).values  # [B, N], invalid last
    n = ok.sum(1)  # [B]
    pos = q * (n - 1).clamp(min=0).to(x.dtype)
    lo, hi = pos.floor().long()[:, None], pos.ceil().long()[:, None]
    v_lo, v_hi = srt.gather(1, lo)[:, 0], srt.gather(1, hi)[:, 0]
    return v_lo + (v_hi - v_lo).nan_to_num(0.0) * (pos - lo[:, 0].to(x.dtype))


def top_fraction_mask(
    maps: Tensor,
    fraction: Optional[float | Tensor] = None,
    valid: Optional[Tensor] = None,
    *,
    quantile: Optional[float | Tensor] = None,
    ties: str = "rank",
    tiebreak: Optional[Tensor] = None,
) -> Tensor:
    """The top ``fraction`` of each sample's features by its map: ``BoolTensor`` of ``maps``' shape ``[B, ...]``.

    Args:
        maps: ``[B, ...]`` scores (pixels ``[B, H, W]``, tokens ``[B, L]``); higher = more relevant. NaN
            entries are never removed and do not count.
        fraction: share of each sample's valid features to remove, in [0, 1], a float or ``[B]`` (per sample):
            ``round(fraction * n)`` features (``n`` = the sample's valid features, halves rounded up).
        valid: ``[B, ...]`` bool, the removable features (e.g. :func:`content_tokens`); default all.
        quantile: instead of ``fraction``: the papers' "features above the q-th percentile" (M2IB / AdaIB:
            ``quantile=0.75`` for pixels), in [0, 1], a float or ``[B]``: as many features as lie strictly above
            NumPy's linear percentile of ``n`` distinct values, ``n - 1 - floor(q (n - 1))`` (1 of 3 tokens at
            0.9, 1,024 of 4,096 pixels at 0.75).
        ties: ``"rank"`` (default) - exactly that count per sample, ranked by the map, ties by ``tiebreak``
            (higher first) then by flat index (lower first), so every map removes the same count;
            ``"threshold"`` - the literal rule ``map > quantile`` (NumPy's linear percentile of the valid
            values; with ``fraction``: of ``1 - fraction``): where values tie it can remove fewer (a binary
            ground-truth mask covering more than a quarter of the image removes nothing at 0.75). With
            ``quantile`` the two agree exactly on tie-free maps. ``"rank"`` is the default so anchors and
            methods compare at equal removed counts.
        tiebreak: optional ``[B, ...]`` secondary key for ``ties="rank"`` (e.g. a random map drawn from the
            sample's seed, for random rather than index-order ties).

    Example:
        >>> m = torch.tensor([[0.1, 0.9, 0.5, 0.7], [1.0, 1.0, 1.0, 1.0]])
        >>> top_fraction_mask(m, 0.5).int()
        tensor([[0, 1, 0, 1],
                [1, 1, 0, 0]], dtype=torch.int32)
        >>> top_fraction_mask(m, quantile=0.5, ties="threshold").int()
        tensor([[0, 1, 0, 1],
                [0, 0, 0, 0]], dtype=torch.int32)
    """
    if (fraction is None) == (quantile is None):
        raise ValueError("pass exactly one of fraction= and quantile=")
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    b = maps.shape[0]
    flat = maps.reshape(b, -1)  # [B, N]
    flat = flat if flat.is_floating_point() else flat.double()
    ok = ~torch.isnan(flat)
    if valid is not None:
        if valid.shape != maps.shape:
            raise ValueError(f"valid must have the maps' shape {tuple(maps.shape)}, got {tuple(valid.shape)}")
        ok = ok & valid.reshape(b, -1).to(flat.device)
    given = torch.as_tensor(fraction if quantile is None else quantile, dtype=torch.float64,
                            device=flat.device).expand(b)  # [B]
    if bool(((given < 0) | (given > 1) | torch.isnan(given)).any()):
        raise ValueError(f"{'fraction' if quantile is None else 'quantile'} must lie in [0, 1], got {given.tolist()}")
    q = given if fraction is None else 1.0 - given
    if ties == "threshold":
        t = _row_quantile(flat, ok, q)  # [B]
        return (ok & (flat > t[:, None])).view(maps.shape)
    n = ok.sum(1)  # [B]
    if fraction is None:  # the tie-free count above the percentile (pos as in _row_quantile)
        k = (n - 1 - torch.floor(q * (n - 1).clamp(min=0).double())).clamp(min=0)
    else:  # nearest, halves up (the epsilon: a product that rounds to just below .5)
        k = torch.floor(given * n + 0.5 + 1e-9)  # [B]
    second = None
    if tiebreak is not None:
        if tiebreak.shape != maps.shape:
            raise ValueError(f"tiebreak must have the maps' shape {tuple(maps.shape)}, got {tuple(tiebreak.shape)}")
        second = tiebreak.reshape(b, -1).to(flat.device).double().nan_to_num(-torch.inf)  # [B, N]
    # valid features first: their values (-inf lifted to the lowest finite value) above every invalid one (-inf)
    key = torch.where(ok, flat.clamp(min=torch.finfo(flat.dtype).min), torch.full_like(flat, -torch.inf))
    out = torch.zeros_like(ok)
    for row in range(b):
        out[row] = _top_k_row(key[row], int(k[row]), None if second is None else second[row])
    return (ok & out).view(maps.shape)


def _top_k_row(key: Tensor, k: int, second: Optional[Tensor]) -> Tensor:
    """The ``k`` first features of one row ``[N]`` in the order (``key`` descending, ``second`` descending,
    index ascending), as a bool mask: the k-th largest key by selection (O(N)), then a sort of the features tied
    with it only - the same features a full lexicographic sort would give, without sorting the row."""
    chosen = torch.zeros(key.shape, dtype=torch.bool, device=key.device)
    if k <= 0:
        return chosen
    if k >= key.numel():
        return ~chosen
    kth = -torch.kthvalue(-key, k).values  # the k-th largest key
    chosen = key > kth
    tied = torch.nonzero(key == kth).flatten()  # ascending index
    need = k - int(chosen.sum())
    if need < tied.numel() and second is not None:  # tied features by second key, descending; stable: index asc
        tied = tied[second[tied].sort(descending=True, stable=True).indices]
    chosen[tied[:need]] = True
    return chosen


def content_tokens(ids: Tensor, eot: Optional[Tensor] = None, start: int = 1) -> Tensor:
    """``[B, L]`` bool: the content tokens of ``ids``, positions ``start .. eot - 1`` (SOT and EOT excluded).

    ``eot`` ``[B]`` defaults to ``ids.argmax(-1)`` (open_clip's rule for CLIP's BPE, where EOT is the largest id);
    pass ``clip.text.eot_positions(ids)`` / ``content_start`` for other tokenizers.

    Example:
        >>> content_tokens(torch.tensor([[49406, 320, 1125, 49407, 0]])).int()
        tensor([[0, 1, 1, 0, 0]], dtype=torch.int32)
    """
    end = ids.argmax(-1) if eot is None else eot.to(ids.device)
    pos = torch.arange(ids.shape[1], device=ids.device)[None]  # [1, L]
    return (pos >= start) & (pos < end[:, None])


# --------------------------------------------------------------------------------------------------- tokens

def remove_tokens(ids: Tensor, removed: Tensor, blank_id: int = PAD_ID) -> Tensor:
    """``ids [B, L]`` with the ``removed [B, L]`` tokens replaced by ``blank_id``.

    Default :data:`PAD_ID` (0, ``"!"`` in CLIP's BPE): M2IB's blank token (Table 1 uses "the padding token"),
    and it leaves open_clip's pooling alone - the text is pooled at ``ids.argmax(-1)``, the original EOT.
    :data:`EOT_ID` (49407) is what AdaIB App. F writes ("padding token ID 49407"); with it the *first*
    replaced token becomes the argmax, so a model pooling at ``argmax`` reads the caption there (the text
    truncated before the first removed token) unless the caller pools at the original EOT
    (``clip.text.eot_positions`` of the clean ids). ``removed`` should exclude SOT / EOT
    (:func:`content_tokens` as ``valid`` of :func:`top_fraction_mask`).

    Example:
        >>> remove_tokens(torch.tensor([[49406, 320, 1125, 49407]]), torch.tensor([[False, True, False, False]]))
        tensor([[49406,     0,  1125, 49407]])
    """
    if removed.shape != ids.shape:
        raise ValueError(f"removed must have the ids' shape {tuple(ids.shape)}, got {tuple(removed.shape)}")
    return torch.where(removed.to(ids.device), torch.full_like(ids, blank_id), ids)


# --------------------------------------------------------------------------------------------------- noise

_MASK32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixing hash of int64 ``x`` in [0, 2^32) (products stay below 2^63: no overflow)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def key_seeds(keys: Sequence[str], seed: int = 0) -> Tensor:
    """``LongTensor[B]`` seeds from sample keys (crc32 of ``f"{seed}:{key}"``), for :func:`keyed_normal`.

    Example:
        >>> key_seeds(["a", "b"]).tolist() == [key_seeds(["a"])[0].item(), key_seeds(["b"])[0].item()]
        True
    """
    return torch.tensor([zlib.crc32(f"{seed}:{k}".encode()) for k in keys], dtype=torch.int64)


def keyed_normal(seeds: Tensor | Sequence[int], shape: Sequence[int], device: Optional[torch.device] = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise ``[B, *shape]``: element ``i`` of sample ``b`` is a hash of ``(seeds[b], i)``.

    Counter-based (Box-Muller on two hashed uniforms), so a sample's noise depends on its seed alone -
    not on its batch, the batch size or the process - and equals on CPU and GPU up to float rounding.

    Example:
        >>> a = keyed_normal([7, 8], (2, 3)); b = keyed_normal([8], (2, 3))
        >>> torch.equal(a[1], b[0]), a.shape
        (True, torch.Size([2, 2, 3]))
    """
    s = torch.as_tensor(seeds, dtype=torch.int64, device=device).reshape(-1, 1) & _MASK32  # [B, 1]
    n = 1
    for d in shape:
        n *= int(d)
    idx = torch.arange(n, dtype=torch.int64, device=s.device)[None]  # [1, n]
    base = _hash32(s ^ 0x9E3779B9)  # [B, 1]

    def uniform(stream: int) -> Tensor:  # (0, 1)
        h = _hash32(_hash32(base ^ (2 * idx + stream) & _MASK32) ^ base)
        return (h.double() + 0.5) / 2.0**32

    u1, u2 = uniform(0), uniform(1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)  # [B, n]
    return z.to(dtype).view(-1, *shape)


# --------------------------------------------------------------------------------------------------- images

def _coarse_start(x: Tensor, known: Tensor) -> Tensor:
    """Masked means from coarse to fine: each unknown pixel gets the mean of the known pixels of the finest
    dyadic cell around it that has any (``x [N, C, H, W]``, ``known [N, 1, H, W]`` float)."""
    levels = [(x * known, known)]
    while min(levels[-1][1].shape[-2:]) > 1:
        xs, ks = levels[-1]
        levels.append((F.avg_pool2d(xs, 2, ceil_mode=True), F.avg_pool2d(ks, 2, ceil_mode=True)))
    est = None
    for xs, ks in reversed(levels):
        mean = xs / ks.clamp_min(1e-12)
        if est is not None:
            up = F.interpolate(est, size=xs.shape[-2:], mode="nearest")
            mean = torch.where(ks > 0, mean, up)
        est = mean
    return est  # [N, C, H, W]


def _neighbour_sum(x: Tensor) -> Tensor:
    """``sum_j w_ij x_j`` over the in-image 8-neighbours of each pixel of ``x [N, 1, H, W]`` (ROAD's weights).

    Shifted slices of the zero-padded input (a 3 x 3 convolution; slices are several times faster than
    ``conv2d`` with one channel on the CPU).
    """
    h, w = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1))  # [N, 1, H+2, W+2]
    edge = p[..., 0:h, 1:w + 1] + p[..., 2:h + 2, 1:w + 1] + p[..., 1:h + 1, 0:w] + p[..., 1:h + 1, 2:w + 2]
    corner = p[..., 0:h, 0:w] + p[..., 0:h, 2:w + 2] + p[..., 2:h + 2, 0:w] + p[..., 2:h + 2, 2:w + 2]
    return edge / 6 + corner / 12


def road_impute(images: Tensor, removed: Tensor, noise: Tensor | float = 0.0, iters: int = 30) -> Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022) of ``removed [N, 1, H, W]`` pixels of ``images [N, C, H, W]``.

    Each removed pixel ``i`` is the weighted mean of its in-image 8 neighbours (weight 1/6 direct, 1/12
    diagonal), known pixels fixed: ``d_i x_i - sum_j w_ij x_j = 0`` (``d_i`` = its in-image weight sum), a
    symmetric positive definite system per image and channel. ROAD solves it exactly with a sparse
    factorisation on the CPU; clipib runs ``iters`` conjugate-gradient steps from coarse-to-fine masked means,
    batched on the device (on a 32 x 32 px hole in white noise 30 steps leave a max error of 0.08 input units,
    50 steps 0.007). An image with no known pixel is left at the start (0: the preprocessing's mean colour).
    ``noise`` is added to the imputed pixels only: a float std (0 = none; drawn from the global generator) or
    a tensor of the images' shape (already scaled, e.g. ``0.01 * keyed_normal(...)``; ROAD's std is 0.01).

    Example (a removed pixel on a linear ramp is interpolated exactly):
        >>> ramp = torch.arange(5.0).expand(1, 1, 5, 5).clone()
        >>> hole = torch.zeros(1, 1, 5, 5, dtype=torch.bool); hole[..., 2, 2] = True
        >>> round(float(road_impute(ramp, hole)[0, 0, 2, 2]), 4)
        2.0
    """
    n, c, h, w = images.shape
    gone = removed.expand(n, c, h, w).reshape(n * c, 1, h, w)  # [NC, 1, H, W]
    x = images.reshape(n * c, 1, h, w)
    known = (~gone).to(x.dtype)
    degree = _neighbour_sum(torch.ones_like(x[:1]))  # [1, 1, H, W]
    rhs = _neighbour_sum(x * known) * gone  # [NC, 1, H, W]: the known neighbours' pull

    def apply(v: Tensor) -> Tensor:  # (D - W) v on the removed pixels, v = 0 elsewhere
        return (degree * v - _neighbour_sum(v)) * gone

    u = _coarse_start(images, (~removed).to(images.dtype)).reshape(n * c, 1, h, w) * gone
    r = rhs - apply(u)
    p, rr = r, r.square().sum((1, 2, 3), keepdim=True)
    for _ in range(iters):
        ap = apply(p)
        alpha = rr / (p * ap).sum((1, 2, 3), keepdim=True).clamp_min(1e-30)
        u, r = u + alpha * p, r - alpha * ap
        rr_new = r.square().sum((1, 2, 3), keepdim=True)
        p, rr = r + rr_new / rr.clamp_min(1e-30) * p, rr_new
    out = torch.where(gone, u, x).view(n, c, h, w)
    if isinstance(noise, Tensor) or noise:
        out = out + removed * (noise if isinstance(noise, Tensor) else noise * torch.randn_like(out))
    return out


def blur_params(height: int, width: int) -> tuple[list[int], list[float]]:
    """InputIBA's blur (kernel 29, sigma 15 at 224 px) scaled to ``height x width``: ``([kx, ky], [sx, sy])``.

    Example:
        >>> blur_params(224, 224), blur_params(32, 64)
        (([29, 29], [15.0, 15.0]), ([9, 5], [4.285714285714286, 2.142857142857143]))
    """
    def kernel(size: int) -> int:  # the radius (14 at 224 px) scales; kernel = 2 * radius + 1
        return 2 * max(1, round(14 * size / 224)) + 1

    return [kernel(width), kernel(height)], [15.0 * width / 224, 15.0 * height / 224]


def blurred_canvas(images: Tensor) -> Tensor:
    """Gaussian-blurred copy of ``images [B, C, H, W]`` with :func:`blur_params` (reflect padding)."""
    h, w = images.shape[-2:]
    k, s = blur_params(h, w)
    k = [min(k[0], 2 * w - 1), min(k[1], 2 * h - 1)]  # reflect padding needs k // 2 < size
    return gaussian_blur(images, kernel_size=k, sigma=s)


def deletion_fill(
    fill: str | float | Sequence[float] = "black",
    channels: int = 3,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> Tensor:
    """Per-channel constant fill ``[C, 1, 1]`` in normalised space.

    ``"black"``: pixel value 0 through the model's normalisation, ``-mean / std`` (needs ``mean``, ``std`` =
    ``clip.normalization``); ``"mean"``: 0, the normalisation's (dataset) mean colour; a float or per-channel
    sequence is used as given.

    Example:
        >>> deletion_fill("black", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).flatten()
        tensor([-2., -2., -2.])
    """
    if fill == "black":
        if mean is None or std is None:
            raise ValueError("fill='black' needs the model's normalisation: pass mean, std = clip.normalization")
        v = [-m / s for m, s in zip(mean, std)]
    elif fill == "mean":
        v = [0.0] * channels
    elif isinstance(fill, str):
        raise ValueError(f"fill must be 'black', 'mean', a float or per-channel values, got {fill!r}")
    else:
        v = [float(fill)] * channels if isinstance(fill, (int, float)) else [float(x) for x in fill]
    if len(v) != channels:
        raise ValueError(f"fill has {len(v)} channels, images have {channels}")
    return torch.tensor(v, dtype=torch.float32)[:, None, None]


def image_fill(images: Tensor, fill: str | float | Sequence[float], mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None) -> Optional[Tensor]:
    """The replacement canvas of a perturbation-metric fill: ``[B, C, H, W]`` for ``"blur"``, ``[C, 1, 1]`` for a
    constant (:func:`deletion_fill`, where ``"mean"`` is the dataset mean colour), None for ``"road"`` (per copy)."""
    if fill == "road":
        return None
    if fill == "blur":
        return blurred_canvas(images)
    return deletion_fill(fill, images.shape[1], mean, std).to(images)


IMAGE_FILLS = ("mean", "blur", "road", "black")
"""The named fills of :func:`remove_image` (besides a number or per-channel numbers)."""


def remove_image(
    images: Tensor,
    removed: Tensor,
    fill: str | float | Sequence[float] = "mean",
    *,
    noise: float | Tensor = 0.01,
    seeds: Optional[Tensor | Sequence[int]] = None,
    iters: int = 30,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> Tensor:
    """``images [B, C, H, W]`` with the ``removed [B, H, W]`` pixels (all channels) replaced.

    Args:
        images: normalised model inputs.
        removed: bool per pixel (:func:`top_fraction_mask` of ``[B, H, W]`` maps).
        fill: ``"mean"`` (default; M2IB Sec. 4.4 and AdaIB App. F) - each image's per-channel mean over all its
            pixels; ``"blur"`` - :func:`blurred_canvas`; ``"road"`` - :func:`road_impute` plus noise;
            ``"black"`` (needs ``mean``, ``std``) or a number / per-channel numbers - a constant in normalised
            space (:func:`deletion_fill`; ``0.0`` is the dataset mean colour).
        noise: ROAD's noise, ``"road"`` only: a std (default 0.01, ROAD's; drawn per sample from
            :func:`keyed_normal` of ``seeds``; 0 = none) or a ready noise tensor of the images' shape.
        seeds: ``[B]`` ints (e.g. :func:`key_seeds` of the sample keys), required for ``"road"`` with a
            float ``noise > 0``.
        iters: ROAD's conjugate-gradient steps.
        mean, std: the model's normalisation (``clip.normalization``), for ``"black"``.

    Example:
        >>> x = torch.arange(8.0).view(1, 2, 2, 2); gone = torch.tensor([[[True, False], [False, False]]])
        >>> remove_image(x, gone)[0, :, 0, 0].tolist()  # the channel means 1.5 and 5.5
        [1.5, 5.5]
    """
    b, c, h, w = images.shape
    if removed.shape != (b, h, w):
        raise ValueError(f"removed must be [B, H, W] = {(b, h, w)}, got {tuple(removed.shape)}")
    gone = removed.to(images.device)[:, None]  # [B, 1, H, W]
    if fill == "mean":
        return torch.where(gone, images.mean(dim=(2, 3), keepdim=True), images)
    if fill == "road":
        eps: float | Tensor = noise
        if not isinstance(noise, Tensor) and noise > 0:
            if seeds is None:
                raise ValueError("fill='road' with noise > 0 needs seeds= (one int per image, e.g. key_seeds(keys))")
            eps = noise * keyed_normal(seeds, (c, h, w), images.device, images.dtype)
        return road_impute(images, gone, eps, iters)
    if isinstance(fill, str) and fill not in IMAGE_FILLS:
        raise ValueError(f"fill must be one of {IMAGE_FILLS}, a number or per-channel numbers, got {fill!r}")
    canvas = blurred_canvas(images) if fill == "blur" else deletion_fill(fill, c, mean, std).to(images)
    return torch.where(gone, canvas, images)
