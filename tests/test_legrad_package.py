"""LeGrad ``readout="package"`` against the authors' package's formulas, written out here per tower family on
the tiny models: each block output from the model's own modules (open_clip / timm forwards), the differentiated
attention written out with an additive probe ``δ`` on its probabilities (∂s/∂δ = ∂s/∂A), checked at δ = 0
against the module's own forward."""

import pytest
import torch
import torch.nn.functional as F

import clipib
from clipib.models.loading import ModelLoadError
from clipib.models.split import SplitCLIP

LAST_TWO = 2  # the package's layer_index=-2


def _grid(clip, rows):
    """``[B, T]`` over the stream rows (class token first) → ``[B, gh, gw]`` on the patches."""
    return rows[:, rows.shape[1] - clip.grid[0] * clip.grid[1]:].reshape(-1, *clip.grid)


def _minmax(m):
    lo = m.flatten(1).amin(1)[:, None, None]
    hi = m.flatten(1).amax(1)[:, None, None]
    return (m - lo) / (hi - lo)


def _probed_mha(q_in, kv_in, wq, wk, wv, bq, bk, bv, out_proj, heads):
    """Multi-head attention written out; returns (output [B, Q, d], probe δ [B, H, Q, T] at zero)."""
    q, k, v = F.linear(q_in, wq, bq), F.linear(kv_in, wk, bk), F.linear(kv_in, wv, bv)
    b, d = kv_in.shape[0], q.shape[-1]
    sh = lambda u: u.reshape(b, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
    probs = (sh(q) @ sh(k).transpose(-1, -2) / (d // heads) ** 0.5).softmax(-1)
    delta = torch.zeros_like(probs, requires_grad=True)
    out = ((probs + delta) @ sh(v)).transpose(1, 2).reshape(b, -1, d)
    return out_proj(out), delta


def _open_clip_block(block, h):
    """An open_clip residual block with its self-attention probed: (output, δ [B, H, T, T])."""
    mha = block.attn
    y = block.ln_1(h)
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    a, delta = _probed_mha(y, y, wq, wk, wv, bq, bk, bv, mha.out_proj, mha.num_heads)
    x = h + block.ls_1(a)
    return x + block.ls_2(block.mlp(block.ln_2(x))), delta


def _open_clip_streams(visual, images):
    """The block outputs of an open_clip ViT, from its own modules: ``[z_0 (embeddings), z_1, ..., z_n]``."""
    hs = [visual._embeds(images)]
    for block in visual.transformer.resblocks:
        hs.append(block(hs[-1]))
    return hs


def _cls_reference(clip, images, target):
    """compute_legrad_clip: s_l = cos(ln_post(mean of every token of z_l) @ proj, text); ∂s_l/∂A_l (block l's
    self-attention), ReLU, mean over heads, mean over query rows, class column dropped, summed over layers."""
    v = clip.model.visual
    hs = _open_clip_streams(v, images)
    n = len(v.transformer.resblocks)
    total = 0
    for layer in range(n - LAST_TWO, n):
        z, delta = _open_clip_block(v.transformer.resblocks[layer], hs[layer].detach())
        torch.testing.assert_close(z, hs[layer + 1], atol=1e-5, rtol=0)  # the probe at 0 is the block
        emb = F.normalize(v.ln_post(z.mean(dim=1)) @ v.proj, dim=-1)
        (g,) = torch.autograd.grad((emb * target).sum(), delta)
        total = total + g.clamp(min=0).mean(dim=1).mean(dim=1)  # heads, then queries: [B, T]
    return _grid(clip, total[:, 1:])


def _coca_reference(clip, images, target):
    """compute_legrad_coca: attn_pool(z_l) without ln_post, query 0, @ proj, dot product with the text (no
    image normalisation); ∂/∂(pooler attention), ReLU, mean over heads, query 0's row, class column dropped."""
    v = clip.model.visual
    pool = v.attn_pool
    mha = pool.attn
    hs = _open_clip_streams(v, images)
    n = len(v.transformer.resblocks)
    total = 0
    for layer in range(n - LAST_TWO, n):
        z = hs[layer + 1].detach()
        q_in = pool.ln_q(pool.query).expand(z.shape[0], -1, -1)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        out, delta = _probed_mha(q_in, pool.ln_k(z), mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight,
                                 bq, bk, bv, mha.out_proj, mha.num_heads)
        torch.testing.assert_close(out, pool(z), atol=1e-5, rtol=0)  # the probe at 0 is open_clip's pooler
        emb = out[:, 0] @ v.proj
        (g,) = torch.autograd.grad((emb * target).sum(), delta)  # [B, H, Q, T]
        total = total + g.clamp(min=0).mean(dim=1)[:, 0]
    return _grid(clip, total[:, 1:])


def _siglip_maps(clip, images, targets):
    """compute_legrad_siglip without the correction, one map per target: trunk.attn_pool(z_l) without the
    trunk's final norm, L2-normalised, cosine with the text; ∂/∂(MAP attention), ReLU, mean heads, latent 0."""
    trunk = clip.model.visual.trunk
    pool = trunk.attn_pool
    h = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(images)))
    hs = [h]
    for block in trunk.blocks:
        hs.append(block(hs[-1]))
    n = len(trunk.blocks)
    totals = [0] * len(targets)
    for layer in range(n - LAST_TWO, n):
        z = hs[layer + 1].detach()
        b, t, c = z.shape
        q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, -1, pool.num_heads, pool.head_dim).transpose(1, 2)
        k, v = pool.kv(z).reshape(b, t, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)
        probs = (q @ k.transpose(-1, -2) * pool.scale).softmax(-1)  # [B, H, 1, T]
        delta = torch.zeros_like(probs, requires_grad=True)
        x = pool.proj(((probs + delta) @ v).transpose(1, 2).reshape(b, -1, c))
        x = (x + pool.mlp(pool.norm(x)))[:, 0]
        torch.testing.assert_close(x, pool(z), atol=1e-5, rtol=0)  # the probe at 0 is timm's MAP head
        emb = F.normalize(x, dim=-1)
        for i, target in enumerate(targets):
            (g,) = torch.autograd.grad((emb * target).sum(), delta, retain_graph=True)
            totals[i] = totals[i] + g.clamp(min=0).mean(dim=1)[:, 0]  # [B, T]
    return [_grid(clip, m) for m in totals]


def _differs(a, b):
    return (a - b).abs().max() > 1e-3 * b.abs().max()


def test_package_readout_on_a_vit(tiny_clip, pairs):
    """The open_clip ViT path (the tiny model pools the patch mean, like clipib-shapes)."""
    images, ids = pairs
    target = F.normalize(tiny_clip.model.encode_text(ids), dim=-1)
    got = clipib.LeGrad(tiny_clip, readout="package").attribute(images, ids, modality="image").image_grid
    ref = _cls_reference(tiny_clip, images, target)
    torch.testing.assert_close(got, ref, atol=1e-7, rtol=1e-4)
    default = clipib.LeGrad(tiny_clip).attribute(images, ids, modality="image").image_grid
    assert _differs(default, ref)  # the read-out matters: the tower's own head gives another map
    with pytest.raises(ValueError, match="correction"):  # the package corrects only on SigLIP
        clipib.LeGrad(tiny_clip, readout="package", correction=True).attribute(images, ids, modality="image")


def test_package_readout_on_coca(tiny_family, family_pairs):
    clip = tiny_family("coca")
    images, ids = family_pairs(clip)
    target = F.normalize(clip.model.encode_text(ids), dim=-1)
    got = clipib.LeGrad(clip, readout="package").attribute(images, ids, modality="image").image_grid
    ref = _coca_reference(clip, images, target)
    torch.testing.assert_close(got, ref, atol=1e-7, rtol=1e-4)
    assert _differs(clipib.LeGrad(clip).attribute(images, ids, modality="image").image_grid, ref)


def test_package_readout_on_siglip_with_and_without_correction(tiny_family, family_pairs, make_siglip_ids):
    base = tiny_family("siglip")
    images, ids = family_pairs(base)
    prompt_ids = make_siglip_ids([4], base.context_length, 1000, seed=7)  # stands in for "a photo of a"
    clip = SplitCLIP(base.model, base.preprocess, lambda texts: prompt_ids.expand(len(texts), -1),
                     name="tiny-siglip", text_tokens=base.text.tokens)  # a tokenizer without transformers
    target = F.normalize(clip.model.encode_text(ids), dim=-1)
    prompt = F.normalize(clip.model.encode_text(prompt_ids), dim=-1)
    main, other = _siglip_maps(clip, images, [target, prompt.expand_as(target)])
    plain = clipib.LeGrad(clip, readout="package", correction=False).attribute(images, ids, modality="image")
    torch.testing.assert_close(plain.image_grid, main, atol=1e-7, rtol=1e-4)
    corrected = main.masked_fill(_minmax(other) > 0.8, 0)
    assert (corrected == 0).sum() > (main == 0).sum()  # the correction zeroes patches here
    got = clipib.LeGrad(clip, readout="package").attribute(images, ids, modality="image")  # correction on
    torch.testing.assert_close(got.image_grid, corrected, atol=1e-7, rtol=1e-4)
    low = clipib.LeGrad(clip, readout="package", correction_threshold=0.3).attribute(images, ids, modality="image")
    assert (low.image_grid == 0).sum() > (got.image_grid == 0).sum()
    assert _differs(clipib.LeGrad(clip).attribute(images, ids, modality="image").image_grid, main)


def test_package_readout_refusals(tiny_clip, tiny_family, family_pairs):
    with pytest.raises(ValueError, match="readout"):
        clipib.LeGrad(tiny_clip, readout="paper")
    with pytest.raises(ValueError, match="readout='package'"):
        clipib.LeGrad(tiny_clip, correction=True)
    eva = tiny_family("eva")  # timm token pooling: the package has no path
    images, ids = family_pairs(eva)
    with pytest.raises(ValueError, match="no path"):
        clipib.LeGrad(eva, readout="package").attribute(images[:1], ids[:1], modality="image")
    model = tiny_family("siglip").model
    images, ids = family_pairs(tiny_family("siglip"))

    def unbuildable(texts):  # a lazily built SigLIP tokenizer without transformers raises this
        raise ModelLoadError("the tokenizer of tiny-siglip needs the 'transformers' package")

    for tokenizer, message in ((None, "no tokenizer"), (unbuildable, "transformers.*correction=False"),
                               (lambda texts: torch.full((len(texts), 16), 5000), "outside its text vocabulary")):
        clip = SplitCLIP(model, None, tokenizer)
        with pytest.raises(ValueError, match=message):  # the correction (on by default here) cannot embed its prompt
            clipib.LeGrad(clip, readout="package").attribute(images[:1], ids[:1], modality="image")
        clipib.LeGrad(clip, readout="package", correction=False).attribute(images[:1], ids[:1], modality="image")
