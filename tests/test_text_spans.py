"""The caption's tokens for bidirectional ``last``-pooled text towers (SigLIP, SigLIP 2, CLIPA), on synthetic ids
shaped exactly as each tokenizer writes them (the HF tokenizers need a download, so the rows are built by hand).

Facts the rows follow, and where each was read (offline, 2026-12-02):

* Pooling. open_clip 3.3 ``transformer.py`` ``text_global_pool``: ``last`` is ``x[:, -1]``, whatever id sits there;
  the SigLIP configs set no ``use_pad_mask``, so no key is masked (``TextTransformer._embeds`` builds a padding
  mask only with ``use_pad_mask`` or a class token). big_vision ``models/proj/image_text/text_transformer.py``
  pools the same way (``x[:, -1]``, "Assuming 'sticky' EOS tokenization, last token is always EOS").
* SigLIP (``hf_tokenizer_name: timm/ViT-*-SigLIP*``, c4-en / mc4 T5 sentencepiece). open_clip ``tokenizer.py``
  ``SigLipTokenizer`` (the class open_clip imports these vocabularies with): ``T5TokenizerFast(extra_ids=0)``,
  ``pad_token_id = 1``, ``eos_token_id = 1`` (T5 appends ``</s>``; no BOS). big_vision's SigLIP demo:
  ``tokenize(max_len=64, eos="sticky", pad_value=1)``, whose docstring (``pp/ops_text.py``) gives
  ``"a" -> [2, 1, 1]`` and, truncated, ``"aaa" -> [2, 2, 1]``. open_clip issue #940 (rwightman): the pad id is 1
  because big_vision pads with 1.
* SigLIP 2 (``timm/ViT-*-SigLIP2*``, Gemma tokenizer). ``SigLipTokenizer``: ``GemmaTokenizerFast(padding_side=
  'right', add_bos_token=False, add_eos_token=True)``, ``pad_token_id = 0``, ``eos_token_id = 1``. big_vision's
  SigLIP 2 demo: ``lower|tok(length=64, model="gemma", bos="no", eos="sticky")``; ``pp/proj/paligemma/ops.py``
  pads that with the tokenizer's pad id (Gemma ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2: transformers PR
  #47627, quoting ``google/siglip2-*/tokenizer_config.json``). So ``[w…, 1, 0, 0, …]``, truncated ``[w₁…w₆₃, 1]``.
* Both: open_clip ``HFTokenizer.__call__`` pads to ``max_length`` with ``truncation=True`` (HF appends the EOS
  after truncating, as big_vision's sticky EOS), after ``clean: canonicalize`` (lower case, punctuation removed).
* CLIPA (``hf_tokenizer_name: bert-base-uncased``, ``strip_sep_token: true``): ``[CLS]`` = 101 first, ``[SEP]``
  (102) rewritten to 0 by ``HFTokenizer.strip_sep_token``, ``[PAD]`` = 0.
"""

import copy
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

import clipib
from clipib.models.split import (BERT_TOKENS, SIGLIP2_GEMMA_TOKENS, SIGLIP_T5_TOKENS, CaptionTokens,
                                 caption_tokens)

CTX = 16  # tests/data/tiny-siglip.json


def _row(words, tail):
    """``words`` then ``tail`` repeated up to the context."""
    return words + [tail[0]] + [tail[1]] * (CTX - len(words) - 1)


W = [17, 250, 9, 400, 33]  # word ids (none is special in any of the three vocabularies)
LONG = list(range(20, 20 + CTX - 1))  # a caption that fills the context: truncated, the EOS kept last

CASES = {
    # layout, rows, caption end (the EOS; CLIPA: the stripped SEP), content tokens of row 0
    "siglip": (SIGLIP_T5_TOKENS, [_row(W[:3], (1, 1)), LONG + [1]], [3, CTX - 1], [0, 1, 2]),
    "siglip2": (SIGLIP2_GEMMA_TOKENS, [_row(W[:3], (1, 0)), LONG + [1]], [3, CTX - 1], [0, 1, 2]),
    "clipa": (BERT_TOKENS, [[101] + _row(W[:3], (0, 0))[:-1], [101] + LONG[:-1] + [0]], [4, CTX - 1], [1, 2, 3]),
}


def _with_tokens(clip, tokens):
    return clipib.SplitCLIP(clip.model, clip.preprocess, clip.tokenizer, name=clip.name, text_tokens=tokens)


@pytest.mark.parametrize("family", sorted(CASES))
def test_caption_span_follows_the_tokenizer(tiny_family, family):
    """The EOS closes the caption and is not a content token; padding is neither; the pooled row stays the last
    position (what the tower reads), and the tower's embedding is open_clip's."""
    tokens, rows, ends, content = CASES[family]
    clip = _with_tokens(tiny_family("siglip"), tokens)
    ids = torch.tensor(rows)
    assert ids.shape == (2, CTX)
    text = clip.text
    assert text.caption_ends(ids).tolist() == ends
    assert text.content_start == content[0]
    assert text.span_mask(ids, special=False)[0].nonzero().flatten().tolist() == content
    assert text.span_mask(ids)[0].nonzero().flatten().tolist() == list(range(ends[0] + 1))  # SOT/words..EOS
    truncated = text.span_mask(ids, special=False)[1].nonzero().flatten().tolist()
    assert truncated == list(range(content[0], CTX - 1))  # every word of a full caption, the kept EOS excluded
    assert text.eot_positions(ids).tolist() == [CTX - 1, CTX - 1]
    with torch.no_grad():
        torch.testing.assert_close(text.encode(ids), F.normalize(clip.model.encode_text(ids), dim=-1),
                                   atol=1e-5, rtol=0)


def test_generic_rule_would_count_siglip2_eos_as_content(tiny_family):
    """Why SigLIP 2 needs its layout: reading the trailing run of the final id (the pad 0) puts the EOS inside
    the caption."""
    ids = torch.tensor([_row(W[:3], (1, 0))])
    generic = _with_tokens(tiny_family("siglip"), None).text
    assert generic.caption_ends(ids).tolist() == [4]
    assert _with_tokens(tiny_family("siglip"), SIGLIP2_GEMMA_TOKENS).text.caption_ends(ids).tolist() == [3]


def test_open_clip_configs_get_their_layout():
    """Every open_clip 3.3 config with a ``last`` / ``first``-pooled text tower maps to a known layout, and
    :func:`clipib.load_clip` passes it to the tower."""
    expect = {"ViT-B-16-SigLIP": SIGLIP_T5_TOKENS, "ViT-B-16-SigLIP-i18n-256": SIGLIP_T5_TOKENS,
              "ViT-B-16-SigLIP2": SIGLIP2_GEMMA_TOKENS, "ViT-SO400M-16-SigLIP2-384": SIGLIP2_GEMMA_TOKENS,
              "ViT-L-14-CLIPA": BERT_TOKENS}
    for name, tokens in expect.items():
        assert caption_tokens(open_clip.get_model_config(name)["text_cfg"], name) == tokens, name
    pooled_last = [n for n in open_clip.list_models()
                   if (open_clip.get_model_config(n) or {}).get("text_cfg", {}).get("pool_type") in ("last", "first")]
    assert len(pooled_last) >= 30
    assert all(caption_tokens(open_clip.get_model_config(n)["text_cfg"], n) is not None for n in pooled_last)
    assert caption_tokens({}, "my-model") is None and CaptionTokens().ends == ()


def test_load_clip_wires_the_layout(tiny_family, tmp_path):
    """``load_clip`` reads the layout from the config (the tiny SigLIP config has no ``hf_tokenizer_name``: its
    name picks open_clip's SigLIP tokenizer, as ``open_clip.get_tokenizer`` does), and ``copy`` keeps it."""
    clip = tiny_family("siglip")
    assert clip.text.tokens == SIGLIP_T5_TOKENS and clip.copy().text.tokens == SIGLIP_T5_TOKENS
    cfg = copy.deepcopy(open_clip.get_model_config("tiny-siglip"))
    cfg["text_cfg"] = {**cfg["text_cfg"], "hf_tokenizer_name": "timm/ViT-B-16-SigLIP2"}
    path = tmp_path / "tiny-gemma.json"
    path.write_text(json.dumps(cfg))
    assert clipib.load_clip(str(path), pretrained=None).text.tokens == SIGLIP2_GEMMA_TOKENS
