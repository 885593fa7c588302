"""LeGrad and Grad-ECLIP against explicit evaluations of their definitions on the tiny models."""

import pytest
import torch
import torch.nn.functional as F

import clipib
from clipib.attribution.common import cosine


def _legrad_reference(tower, x, target, layers, relu=True, final_score=False):
    """``Σ_l mean_heads mean_queries ReLU(∂s_l/∂A_l)`` by autograd through an additive probe ``δ`` on each
    block's attention probabilities (∂s/∂δ = ∂s/∂A): ``s_l`` = cosine of the head on block l's output."""
    out = 0
    for layer in layers:
        probe = {}

        def add(index, attn):
            probe["d"] = torch.zeros_like(attn, requires_grad=True)
            return attn + probe["d"]

        with torch.no_grad():
            h = tower.prefix(x, layer)
        z = tower.run(h, layer, layer + 1, attn_hook=add)
        if final_score:
            z = tower.run(z, layer + 1, tower.n_layers)
        s = cosine(tower.head(z, x), target)
        (g,) = torch.autograd.grad(s.sum(), probe["d"])
        out = out + (g.clamp(min=0) if relu else g).mean(dim=(1, 2))
    return tower.to_grid(out)


@pytest.mark.parametrize("family", ["tiny", "siglip"])
def test_legrad_is_positive_attention_gradients_of_each_layer(tiny_clip, pairs, tiny_family, family_pairs, family):
    clip = tiny_clip if family == "tiny" else tiny_family(family)
    images, ids = pairs if family == "tiny" else family_pairs(clip)
    images, ids = images[:2], ids[:2]
    tower = clip.image
    target = clip.text.encode(ids)
    attr = clipib.LeGrad(clip).attribute(images, ids, modality="image")
    layers = [tower.n_layers - 2, tower.n_layers - 1]
    ref = _legrad_reference(tower, images, target, layers)
    torch.testing.assert_close(attr.image_grid, ref, atol=1e-6, rtol=1e-4)
    # a finite difference on one probability of the first chosen layer agrees with the autograd gradient
    layer, eps = layers[0], 1e-3
    with torch.no_grad():
        h = tower.prefix(images[:1], layer)

        def bump(sign):
            def hook(index, attn):
                attn = attn.clone()
                attn[0, 0, 1, 2] += sign * eps
                return attn
            return cosine(tower.head(tower.run(h, layer, layer + 1, attn_hook=hook), images[:1]), target[:1])

        fd = (bump(1) - bump(-1)) / (2 * eps)
    probe = {}

    def add(index, attn):
        probe["d"] = torch.zeros_like(attn, requires_grad=True)
        return attn + probe["d"]

    s = cosine(tower.head(tower.run(h, layer, layer + 1, attn_hook=add), images[:1]), target[:1])
    (g,) = torch.autograd.grad(s.sum(), probe["d"])
    torch.testing.assert_close(g[0, 0, 1, 2].reshape(1), fd, atol=1e-4, rtol=1e-2)
    # wrong implementations differ: signed gradients, or the final similarity instead of each layer's own
    for wrong in (_legrad_reference(tower, images, target, layers, relu=False),
                  _legrad_reference(tower, images, target, layers, final_score=True)):
        assert (wrong - ref).abs().max() > 1e-3 * ref.abs().max()
    assert (attr.image_grid >= 0).all()


def _explicit_last_block(block, h, mask):
    """An open_clip block written out: returns (output, O before out_proj [B, T, D], q, k, v [B, T, D])."""
    mha = block.attn
    y = block.ln_1(h)
    b, t, d = y.shape
    heads = mha.num_heads
    q, k, v = F.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)  # [B, T, D]
    split = lambda u: u.reshape(b, t, heads, d // heads).transpose(1, 2)  # noqa: E731
    logits = split(q) @ split(k).transpose(-1, -2) * (d // heads) ** -0.5
    if mask is not None:
        logits = logits + mask
    o = (logits.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, t, d).detach().requires_grad_(True)
    x = h + block.ls_1(mha.out_proj(o))
    return x + block.ls_2(block.mlp(block.ln_2(x))), o, q, k, v


def _grad_eclip_reference(tower, x, target, row):
    """The paper's definition on the last block: w = ∂S/∂O[row], λ = minmax cos(q_row, k_i) over the keys the
    row attends to, H_i = ReLU(Σ_c w_c v_ic λ_i)."""
    n = tower.n_layers
    with torch.no_grad():
        h = tower.prefix(x, n - 1)
    mask = tower._mask(h.shape[1])
    z, o, q, k, v = _explicit_last_block(tower.blocks[n - 1], h, mask)
    s = cosine(tower.head(z, x), target)
    (g,) = torch.autograd.grad(s.sum(), o)  # [B, T, D]
    rows = torch.arange(x.shape[0])
    w = g[rows, row]  # [B, D]: channel weights
    cos = (F.normalize(q[rows, row], dim=-1)[:, None] * F.normalize(k, dim=-1)).sum(-1)  # [B, T]
    seen = torch.arange(cos.shape[1])[None] <= (row[:, None] if mask is not None else cos.shape[1])  # causal keys
    lo = cos.masked_fill(~seen, 9).amin(1, keepdim=True)
    hi = cos.masked_fill(~seen, -9).amax(1, keepdim=True)
    lam = ((cos - lo) / (hi - lo)).masked_fill(~seen, 0)
    return torch.relu(((w[:, None] * v).sum(-1) * lam).detach())  # [B, T]


def test_grad_eclip_channel_weights_are_attention_output_gradients(tiny_clip, pairs):
    images, ids = pairs
    clip = tiny_clip
    attr = clipib.GradECLIP(clip, text_blocks=1).attribute(images, ids, modality="both")
    e_img, e_txt = clip.image.encode(images), clip.text.encode(ids)
    ref_img = _grad_eclip_reference(clip.image, images, e_txt, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(attr.image_grid, clip.image.to_grid(ref_img), atol=1e-6, rtol=1e-4)
    eot = clip.text.eot_positions(ids)
    ref_txt = _grad_eclip_reference(clip.text, ids, e_img, eot)  # [B, L]
    span = clip.text.span_mask(ids)[:, : ref_txt.shape[1]]
    torch.testing.assert_close(attr.text_raw[:, : ref_txt.shape[1]], ref_txt * span, atol=1e-6, rtol=1e-4)
    # without the spatial weights the map changes (λ is used), and is still non-negative
    flat = clipib.GradECLIP(clip, spatial=False).attribute(images, ids, modality="image")
    assert (flat.image_grid - attr.image_grid).abs().max() > 1e-3 * attr.image_grid.abs().max()


def test_grad_eclip_text_blocks_sum(tiny_clip, pairs):
    """``text_blocks`` blocks are summed before the ReLU: 3 blocks differ from 1 on the 3-block tiny tower."""
    images, ids = pairs
    one = clipib.GradECLIP(tiny_clip, text_blocks=1).attribute(images, ids, modality="text").text_raw
    three = clipib.GradECLIP(tiny_clip, text_blocks=3).attribute(images, ids, modality="text").text_raw
    assert (one - three).abs().max() > 1e-4
