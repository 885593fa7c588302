"""Untrusted files and input (issue #19 items 1-2): checkpoints, keys and paths, images, captions, escaping.

Every crafted file is generated here, in ``tmp_path``. The end-to-end eval run is in test_untrusted_eval.py.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import clipib
from clipib.cli import main
from clipib.data.common import ClipCollate, PairDataset, skip_item, skip_reason
from clipib.data.sources.base import ModelTransforms
from clipib.data.sources.refcoco import decode_mask, read_refcoco
from clipib.data.sources.tables import read_csv, read_flickr8k, read_tsv
from clipib.data.sources.rows import Selection
from clipib.data.sources.webdataset import ShardDataset
from clipib.models.loading import ModelLoadError
from clipib.untrusted import (MAX_ASPECT, Rejected, clean_caption, decode_caption, decode_image, key_problem,
                              markdown_text, safe_name, tar_members)

TINY = "tests/data/tiny-clip.json"
PRE = open_clip.image_transform(32, is_train=False)
TOKENIZER = open_clip.get_tokenizer("ViT-B-32")
SCRIPT = "<script>alert(1)</script>"


# --- crafted images -------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels and holds none (header of a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def solid(colour, size=(6, 4), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def halves(size=(4, 2)) -> Image.Image:
    """Left half red, right half blue."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2] = (255, 0, 0)
    a[:, size[0] // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


def animated(fmt: str) -> bytes:
    """Two frames: red, then blue."""
    extra = {"lossless": True} if fmt == "WEBP" else {}
    return encode(solid((255, 0, 0)), fmt, save_all=True, append_images=[solid((0, 0, 255))], duration=50, **extra)


def rgb_at(img: Image.Image, xy=(0, 0)):
    return tuple(int(v) for v in img.getpixel(xy))


BAD_IMAGES = {  # name -> (bytes, reason name)
    "bomb_header": (lambda: png_header(20_000, 20_000), "image too large"),
    "truncated_png": (lambda: encode(halves((64, 64)).resize((64, 64)))[:60], "truncated image"),
    "truncated_jpeg": (lambda: encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), np.uint8)),
                                      "JPEG")[:400], "truncated image"),
    "zero_bytes": (lambda: b"", "empty image"),
    "random_bytes": (lambda: np.random.default_rng(1).bytes(4096), "undecodable image"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_are_refused_with_a_reason(name, tmp_path, monkeypatch):
    """Refused from bytes and from a path, with the named reason; the bomb even when PIL's own limit is off."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # some library disabled PIL's guard: ours still holds
    data, reason = BAD_IMAGES[name][0](), BAD_IMAGES[name][1]
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(Rejected) as info:
            decode_image(source)
        assert info.value.reason == reason and "\n" not in str(info.value), str(info.value)
        assert skip_reason(str(info.value)) == reason


def test_image_modes_become_the_right_rgb():
    """CMYK, 16-bit, palette with transparency, alpha, EXIF orientation: the RGB a viewer would show."""
    cmyk = decode_image(encode(solid((255, 0, 0, 0), mode="CMYK"), "JPEG", quality=100))  # pure cyan ink
    r, g, b = rgb_at(cmyk)
    assert r < 30 and g > 225 and b > 225
    grey16 = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert [rgb_at(decode_image(encode(grey16)), (x, 0))[0] for x in range(3)] == [0, 128, 255]  # rescaled, not clipped
    pal = solid((0, 0, 0)).convert("P")  # palette index 0 = black, made transparent
    assert rgb_at(decode_image(encode(pal, transparency=0))) == (255, 255, 255)
    rgba = solid((255, 0, 0, 0), mode="RGBA")
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    got = decode_image(encode(rgba))
    assert rgb_at(got, (0, 0)) == (255, 255, 255) and rgb_at(got, (1, 0)) == (255, 0, 0)  # over white
    half = decode_image(encode(solid((0, 0, 0, 128), mode="RGBA")))
    assert 120 <= rgb_at(half)[0] <= 135
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    turned = decode_image(encode(halves((4, 2)), exif=exif))
    assert turned.size == (2, 4)  # upright: the red half on top
    assert rgb_at(turned, (0, 0)) == (255, 0, 0) and rgb_at(turned, (0, 3)) == (0, 0, 255)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animations_give_their_first_frame(fmt):
    img = decode_image(animated(fmt))
    assert img.mode == "RGB" and rgb_at(img)[0] > 200 and rgb_at(img)[2] < 50


def test_tiny_and_extreme_aspect_images_are_bounded():
    one = decode_image(encode(solid((0, 255, 0), size=(1, 1))))
    assert one.size == (1, 1) and tuple(PRE(one).shape) == (3, 32, 32)
    for size in ((3000, 2), (2, 3000)):
        img = decode_image(encode(halves(size) if size[0] > size[1] else solid((9, 9, 9), size=size)))
        assert max(img.size) == MAX_ASPECT * min(img.size) == 40, img.size  # centre kept, resize bounded
        assert tuple(PRE(img).shape) == (3, 32, 32)
    # the usual preprocess (short side, centre crop) sees the same centre as on the uncropped image
    wide = Image.fromarray(np.random.default_rng(2).integers(0, 255, (8, 8 * 30, 3), np.uint8))
    assert torch.allclose(PRE(decode_image(encode(wide))), PRE(wide), atol=0.05)


# --- captions ---------------------------------------------------------------------------------------------------


def test_captions_cleaned_cut_or_refused():
    assert clean_caption("a\x00red\x1b[31m \tcircle\x85") == ("a red [31m circle", False)
    rtl, emoji = "עיגול אדום", "a 🔴 circle 👩‍👩‍👧 \u200f"
    assert clean_caption(rtl) == (rtl, False) and clean_caption(emoji) == (emoji, False)  # kept as they are
    text, cut = clean_caption("word " * 2000)
    assert cut and len(text) <= 4096
    with pytest.raises(Rejected, match="non-UTF-8 caption"):
        clean_caption("caf\udce9")  # bytes read with surrogateescape
    for data, reason in ((None, "missing caption"), (b"", "empty caption"), (b" \t\n\x00 ", "empty caption"),
                         (b"caf\xe9", "non-UTF-8 caption"), (b"\xff\xfe", "non-UTF-8 caption")):
        with pytest.raises(Rejected) as info:
            decode_caption(data)
        assert info.value.reason == reason
    assert decode_caption("🔴 עיגול".encode()) == ("🔴 עיגול", False)


def test_collate_marks_captions_the_tokenizer_cuts():
    collate = ClipCollate(TOKENIZER, (32, 32))
    image = torch.zeros(3, 32, 32)
    items = [{"key": "short", "image": image, "caption": "a red circle"},
             {"key": "long", "image": image, "caption": "a red circle " * 30},
             {"key": "cut", "image": image, "caption": "x", "caption_truncated": True},
             {"key": "rtl", "image": image, "caption": "🔴 עיגול אדום"}]
    batch = collate(items)
    assert batch["caption_truncated"].tolist() == [False, True, True, False]
    assert batch["ids"].shape == (4, 77)


def test_table_captions_and_bytes(tmp_path):
    """TSV / CSV / Flickr8k JSON / grounding JSON lines with bad bytes, empty, control and long captions."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "t.tsv").write_bytes(b"caf\xe9\ta.png\n \t a.png\n\x01\x02\ta.png\nok \x1b caption\ta.png\n"
                                     + ("long " * 3000).encode() + b"\ta.png\n\xd7\xa2\xd7\x91 \xf0\x9f\x94\xb4\ta.png\n")
    rows = read_tsv(tmp_path / "t.tsv")
    assert [skip_reason(r.get("skip", "")) for r in rows[:3]] == ["non-UTF-8 caption", "empty caption", "empty caption"]
    assert rows[3]["caption"] == "ok caption" and "skip" not in rows[3]
    assert rows[4]["caption_truncated"] and "skip" not in rows[4] and rows[5]["caption"] == "עב 🔴"
    (tmp_path / "c.csv").write_bytes(b"caption,file_path\ncaf\xe9,a.png\n\"" + b"y" * 200_000 + b"\",a.png\nfine,a.png\n")
    rows = read_csv(tmp_path / "c.csv")  # a bad byte or a 200 KB caption fails its row, not the file
    assert skip_reason(rows[0]["skip"]) == "non-UTF-8 caption" and rows[1]["caption_truncated"]
    assert rows[2]["caption"] == "fine"
    (tmp_path / "f.json").write_bytes(b'[{"image": "a.png", "caption": ["caf\xe9", "  ", "good one"]}, 7]')
    rows = read_flickr8k(tmp_path / "f.json")
    assert rows[0]["candidates"] == ["good one"] and skip_reason(rows[1]["skip"]) == "malformed row"
    (tmp_path / "g.jsonl").write_bytes(b'{"image": "a.png", "expression": "caf\xe9", "box": [0, 0, 1, 1]}\n'
                                       b'{"image": "a.png", "expression": "ok", "box": [0, 0, 1, 1]}\n')
    rows = read_refcoco(tmp_path / "g.jsonl")
    assert skip_reason(rows[0]["skip"]) == "non-UTF-8 caption" and "skip" not in rows[1]


def test_an_rle_cannot_allocate_past_its_image():
    with pytest.raises(ValueError, match="RLE size"):
        decode_mask({"size": [100_000, 100_000], "counts": [1, 2]}, 8, 8)


# --- keys and paths ---------------------------------------------------------------------------------------------


def test_unsafe_keys_and_names():
    for key in ("../../x", "a/../b", "/etc/passwd", "\\\\host\\share", "C:evil", "a\x00b", "a\nb", "", "k" * 600):
        assert key_problem(key), key
    for key in ("000123", "shard/000123", "a.b-c_d", "émoji🔴", "a..b"):
        assert key_problem(key) is None, key
    assert safe_name("../../x") == ".._.._x" and safe_name("..") == "_.." and "/" not in safe_name("/a/b")
    with pytest.raises(ValueError, match="unknown skip reason"):
        skip_item("k", "made up")


def test_table_paths_stay_under_the_image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (root / "t.tsv").write_text("a\t../outside.png\nb\thttp://h/x/..%2F..%2Foutside.png\nc\thttp://h/%2E%2E\n")
    rows = read_tsv(root / "t.tsv")
    assert [skip_reason(r["skip"]) for r in rows] == ["unsafe image path", "missing image file", "unsafe image path"]
    assert rows[1]["image"] == str(root / "outside.png")  # the URL's file name, inside the root
    (root / "f.json").write_text(json.dumps([{"image": "../../outside.png", "caption": ["x"]}]))
    assert read_flickr8k(root / "f.json")[0]["skip"] == "unsafe image path"
    unsafe = PairDataset([{"key": "../../k", "image": str(tmp_path / "outside.png"), "caption": "x"}], PRE)[0]
    assert skip_reason(unsafe["skip"]) == "unsafe key"


class _FakeHF:
    """A Hugging Face tokenizer's interface, as open_clip's ``HFTokenizer`` calls it (transformers is not installed):
    one id per word, EOS appended as special token, right truncation keeping EOS (as HF's ``truncation=True``)."""

    bos_token_id, eos_token_id, pad_token_id, cls_token_id = 2, 1, 0, 3

    def encode(self, text, add_special_tokens=True):
        ids = [10 + len(w) for w in text.split()]
        return ids + [self.eos_token_id] if add_special_tokens else ids

    def __call__(self, texts, return_tensors=None, max_length=None, padding=False, truncation=False,
                 add_special_tokens=True):
        rows = [self.encode(t, add_special_tokens) for t in texts]
        if truncation:
            rows = [r if len(r) <= max_length else r[: max_length - 1] + [self.eos_token_id] for r in rows]
        if padding == "max_length":
            rows = [r + [self.pad_token_id] * (max_length - len(r)) for r in rows]
        return type("Encoding", (), {"input_ids": torch.tensor(rows) if return_tensors == "pt" else rows,
                                     "__getitem__": lambda self, k: getattr(self, k)})()


def _hf_tokenizer(mode: str = "", clean: str = "canonicalize", context: int = 6):
    """open_clip's real ``HFTokenizer`` around :class:`_FakeHF` (its ``__init__`` would load transformers)."""
    tok = object.__new__(open_clip.tokenizer.HFTokenizer)
    tok.tokenizer_mode, tok.context_length, tok.strip_sep_token = mode, context, False
    tok.clean_fn, tok.tokenizer = open_clip.tokenizer.get_clean_fn(clean), _FakeHF()
    return tok


@pytest.mark.parametrize("mode,fits", [("", 5), ("clips", 3)])
def test_collate_counts_hf_tokenizer_truncation(mode, fits):
    """HFTokenizer (SigLIP family): a caption counts as cut exactly when the tokenizer drops a word; its clean
    function runs first (punctuation removed by ``canonicalize`` is not counted)."""
    tok = _hf_tokenizer(mode)
    collate = ClipCollate(tok, (32, 32))
    image = torch.zeros(3, 32, 32)
    captions = {"short": "a red circle", "fits": " ".join(["w"] * fits), "over": " ".join(["w"] * (fits + 1)),
                "punct": " ".join(["w"] * fits) + " , ! ?", "long": "a red circle " * 30}
    batch = collate([{"key": k, "image": image, "caption": c} for k, c in captions.items()])
    assert batch["ids"].shape == (5, 6)
    assert batch["caption_truncated"].tolist() == [False, False, True, False, True]
    for caption, cut in zip(captions.values(), batch["caption_truncated"].tolist()):  # the same rule as the tokenizer
        whole = tok([caption], context_length=64)[0]
        assert cut == (int((whole != 0).sum()) > 6)


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_shard_members_never_become_paths(tmp_path):
    """A member named ../../evil.jpg or /abs/x.jpg is a named skip and nothing is written; a shard of random
    bytes is one unreadable-shard skip; bad images and captions in a shard are one named skip each."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    good = encode(halves((16, 16)))
    with tarfile.open(work / "00000.tar", "w") as tf:
        for name, data in [("../../evil.jpg", good), ("../../evil.txt", b"x"), ("/abs/pic.jpg", good),
                           ("/abs/pic.txt", b"x"), ("ok.jpg", good), ("ok.txt", b"a red\x00circle"),
                           ("bomb.png", png_header(20_000, 20_000)), ("bomb.txt", b"x"), ("empty.jpg", b""),
                           ("empty.txt", b"x"), ("blank.jpg", good), ("blank.txt", b" \t "),
                           ("latin.jpg", good), ("latin.txt", b"caf\xe9"), ("anim.gif", animated("GIF")),
                           ("anim.txt", b"moving")]:
            _member(tf, name, data)
    (work / "00001.tar").write_bytes(np.random.default_rng(3).bytes(10_000))
    data = ShardDataset(str(work / "{00000..00001}.tar"), image_exts=("jpg", "png", "gif"))
    data.use_transforms(ModelTransforms.of(PRE, TOKENIZER))
    data.prepare(0, 1, batch_size=2, num_workers=0)
    before = {p for p in tmp_path.rglob("*")}
    items = {it["key"]: it for it in data}
    assert {p for p in tmp_path.rglob("*")} == before  # nothing written anywhere
    reasons = {k: skip_reason(it["skip"]) for k, it in items.items() if "skip" in it}
    assert reasons == {"00000/../../evil": "unsafe key", "00000//abs/pic": "unsafe key", "00000/bomb": "image too large",
                       "00000/empty": "empty image", "00000/blank": "empty caption",
                       "00000/latin": "non-UTF-8 caption", "00001": "unreadable shard"}
    assert items["00000/ok"]["caption"] == "a red circle" and items["00000/anim"]["caption"] == "moving"


def _shard_with_big_members(folder: Path, suffix: str) -> str:
    """One shard (``.tar`` or ``.tar.gz``): samples a, b, c, d; b's image and c's caption are 3 MB members (zeros:
    a gzip shard holds them in a few KB, the case a byte bound on the shard cannot catch), d has an unused 3 MB
    ``.json`` member."""
    folder.mkdir(parents=True)
    good, big = encode(halves((16, 16))), bytes(3_000_000)
    path = folder / f"00000.{suffix}"
    with tarfile.open(path, "w:gz" if suffix.endswith("gz") else "w") as tf:
        for name, data in [("a.jpg", good), ("a.txt", b"first"), ("b.jpg", big), ("b.txt", b"big image"),
                           ("c.jpg", good), ("c.txt", big), ("d.jpg", good), ("d.txt", b"last"), ("d.json", big)]:
            _member(tf, name, data)
    return str(path)


@pytest.mark.parametrize("suffix", ["tar", "tar.gz"])
def test_oversized_shard_members_are_skipped_unread(suffix, tmp_path):
    """A member past ``max_member_bytes`` (by its tar header) is not read: its sample is one ``member too large``
    skip and the stream goes on; an unused oversized member harms nothing. The first pass (scan) agrees."""
    shard = _shard_with_big_members(tmp_path / "shards", suffix)
    with open(shard, "rb") as f:
        members = dict(tar_members(f, max_bytes=1_000_000))
    assert isinstance(members["b.jpg"], Rejected) and members["b.jpg"].reason == "member too large"
    assert "3000000 bytes" in str(members["b.jpg"]) and members["d.txt"] == b"last"

    data = ShardDataset(shard, max_member_bytes=1_000_000)
    data.use_transforms(ModelTransforms.of(PRE, TOKENIZER))
    data.prepare(0, 1, batch_size=2, num_workers=0)
    items = list(data)
    assert [it["key"] for it in items] == ["00000/a", "00000/b", "00000/c", "00000/d"]
    assert [skip_reason(it.get("skip", "")) for it in items] == ["other", "member too large", "member too large", "other"]
    assert items[0]["caption"] == "first" and items[3]["caption"] == "last"
    default = ShardDataset(shard)  # 64 MiB: every member is read
    default.use_transforms(ModelTransforms.of(PRE, TOKENIZER))
    assert skip_reason(next(it for it in default if it["key"] == "00000/b")["skip"]) == "undecodable image"

    selecting = ShardDataset(shard, max_member_bytes=1_000_000, selection=Selection(mismatched=True),
                             manifest=str(tmp_path / "manifest"))
    selecting.use_transforms(ModelTransforms.of(PRE, TOKENIZER))
    selecting.prepare(0, 1, batch_size=2, num_workers=0)
    scan = [json.loads(line) for p in (tmp_path / "manifest" / "scan").glob("*.jsonl") for line in p.read_text().splitlines()]
    assert [(line["k"], skip_reason(line.get("s", ""))) for line in scan] == [
        ("00000/a", "other"), ("00000/b", "member too large"), ("00000/c", "member too large"), ("00000/d", "other")]
    reasons = {it["key"]: skip_reason(it["skip"]) for it in selecting if "skip" in it}
    assert reasons == {"00000/b": "member too large", "00000/c": "member too large"}


# --- checkpoints -------------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this object writes a marker file (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(0)
    return dict(clipib.load_clip(TINY, pretrained=None).model.state_dict())


@pytest.mark.parametrize("kind", ["torch_zip", "raw_pickle"])
def test_a_checkpoint_that_runs_code_is_refused(kind, tmp_path, tiny_state, monkeypatch):
    """Refused with one clear line and the code never runs — even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 and a
    torch.load that makes open_clip fall back to an unqualified call (its retry on TypeError)."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    if kind == "torch_zip":
        torch.save({**tiny_state, "extra": _RunsCode(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"state_dict": _RunsCode(marker)}))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    real_load = torch.load

    def no_weights_only_kwarg(*args, **kwargs):  # an old torch, or a file crafted to raise TypeError there
        if kwargs.get("weights_only") is True:
            raise TypeError("simulated: torch.load() got an unexpected keyword argument 'weights_only'")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", no_weights_only_kwarg)
    with pytest.raises(ModelLoadError) as info:
        clipib.load_clip(TINY, pretrained=str(path))
    message = str(info.value)
    assert message.startswith("refused checkpoint") and "unpickling" in message and "safetensors" in message
    assert "\n" not in message and not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_weights_only_checkpoints_still_load(tmp_path, tiny_state):
    from safetensors.torch import save_file

    torch.save(tiny_state, tmp_path / "plain.pt")
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(tmp_path / "w.safetensors"))
    for name in ("plain.pt", "w.safetensors"):
        loaded = clipib.load_clip(TINY, pretrained=str(tmp_path / name)).model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in tiny_state.items())


def test_cli_refuses_a_code_running_checkpoint(tmp_path, tiny_state, capsys):
    marker = tmp_path / "marker"
    torch.save({**tiny_state, "extra": _RunsCode(marker)}, tmp_path / "evil.pt")
    code = main(["explain", "--image", "src/clipib/assets/sample.png", "--text", "a", "--model", TINY,
                 "--pretrained", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("clipib: error: refused checkpoint") and "\n" not in err
    assert not marker.exists()


# --- clipib explain: one line per bad image, escaped HTML -------------------------------------------------------


def _explain(tmp_path, image: Path, text: str = "a red circle") -> int:
    return main(["explain", "--image", str(image), "--text", text, "--method", "saliency", "--model", TINY,
                 "--pretrained", "none", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_cli_bad_image_is_one_line(name, tmp_path, capsys):
    path = tmp_path / "bad.png"
    path.write_bytes(BAD_IMAGES[name][0]())
    code = _explain(tmp_path, path)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("clipib: error: cannot use") and "\n" not in err, err
    assert BAD_IMAGES[name][1] in err


@pytest.mark.parametrize("case", ["cmyk", "gif", "webp", "wide", "one_pixel", "rtl_emoji", "controls"])
def test_cli_odd_but_valid_input_works(case, tmp_path):
    images = {"cmyk": lambda: encode(solid((0, 255, 255, 0), mode="CMYK"), "JPEG"), "gif": lambda: animated("GIF"),
              "webp": lambda: animated("WEBP"), "wide": lambda: encode(halves((900, 3))),
              "one_pixel": lambda: encode(solid((1, 2, 3), size=(1, 1)))}
    path = tmp_path / "img"
    path.write_bytes(images.get(case, images["one_pixel"])())
    text = {"rtl_emoji": "עיגול אדום 🔴", "controls": "a\x1b red\x7f circle"}.get(case, "a red circle")
    assert _explain(tmp_path, path, text) == 0
    saved = json.loads((tmp_path / "out" / "explanation.json").read_text())
    assert saved["pairs"][0]["caption"] == {"controls": "a red circle"}.get(case, text)


def test_captions_are_escaped_in_the_html(tiny_clip, tmp_path):
    attr = clipib.explain(tiny_clip, "src/clipib/assets/sample.png", f"a {SCRIPT} circle", method="saliency",
                          pretrained=None)
    paths = attr.save(tmp_path)
    page = Path(paths["html"]).read_text()
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert json.loads(Path(paths["json"]).read_text())["pairs"][0]["caption"] == f"a {SCRIPT} circle"


def test_markdown_cells_cannot_inject():
    cell = markdown_text(f"{SCRIPT} [x](javascript:alert(1)) | col\n# head")
    assert "<" not in cell and "[x]" not in cell and " | col" not in cell and "\n" not in cell
    assert cell.startswith("&lt;script&gt;alert(1)&lt;/script&gt;")
