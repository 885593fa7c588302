"""Tables: Conceptual Captions TSV, caption,file_path CSV, Flickr8k JSON (best caption), class folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipib.data.common import PairDataset
from clipib.data.selection import choose_best_captions, score_rows
from clipib.data.sources.base import ModelTransforms
from clipib.data.sources.tables import CsvDataset, Flickr8kDataset, FolderDataset, TsvDataset, read_csv, read_flickr8k, read_folders, read_tsv

PRE = open_clip.image_transform(32, is_train=False)
TRANSFORMS = ModelTransforms.of(PRE, open_clip.get_tokenizer("ViT-B-32"))


def save_image(path: Path, color=None, size=(24, 16)) -> Path:
    """A small PNG/JPEG (by suffix): a solid ``color`` or random pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        pixels = np.random.RandomState(len(str(path))).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    else:
        pixels = np.broadcast_to(np.array(color, dtype=np.uint8), (size[1], size[0], 3)).copy()
    Image.fromarray(pixels).save(path)
    return path


def test_tsv_rows_urls_paths_and_missing(tmp_path: Path) -> None:
    save_image(tmp_path / "imgs" / "a.jpg")
    save_image(tmp_path / "imgs" / "sub" / "b.png")
    (tmp_path / "cc.tsv").write_bytes(
        b"a dog on grass\thttps://host.example/path/a.jpg?x=1\n"
        b'a "red" car\tsub/b.png\r\n'
        b"a missing picture\tnowhere.jpg\n"
        b"no tab on this line\n"
        b"caf\xe9 latin-1\tsub/b.png\n"
    )
    rows = read_tsv(tmp_path / "cc.tsv", tmp_path / "imgs")
    assert [r["key"] for r in rows] == ["0", "1", "2", "3", "4"] and "malformed" in rows[4]["skip"]
    assert rows[0]["image"] == str(tmp_path / "imgs" / "a.jpg") and rows[0]["caption"] == "a dog on grass"
    assert "skip" not in rows[1] and rows[1]["image"].endswith("sub/b.png")
    assert rows[2]["skip"].startswith("missing image file") and rows[3]["skip"].startswith("malformed row")
    items = [PairDataset(rows, PRE)[i] for i in range(4)]
    assert tuple(items[0]["image"].shape) == (3, 32, 32) and items[1]["caption"] == 'a "red" car'
    assert [("skip" in it) for it in items] == [False, False, True, True]


def test_csv_caption_file_path(tmp_path: Path) -> None:
    save_image(tmp_path / "x.png")
    (tmp_path / "nib.csv").write_text('caption,file_path\n"a cat, sleeping",x.png\n,x.png\nghost,y.png\n')
    rows = read_csv(tmp_path / "nib.csv")
    assert rows[0]["caption"] == "a cat, sleeping" and "skip" not in rows[0]
    assert rows[1]["skip"] == "missing caption" and rows[2]["skip"].startswith("missing image file")
    (tmp_path / "bad.csv").write_text("text,path\na,b\n")
    with pytest.raises(ValueError, match="caption"):
        read_csv(tmp_path / "bad.csv")


def test_undecodable_table_image_is_a_skip(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"garbage")
    (tmp_path / "t.csv").write_text("caption,file_path\nbroken,broken.jpg\n")
    item = PairDataset(read_csv(tmp_path / "t.csv"), PRE)[0]
    assert item["key"] == "0" and "undecodable image" in item["skip"]


def colour_score(images: torch.Tensor, captions: List[str]) -> torch.Tensor:
    """Fake CLIP: high when the caption names the dominant colour of the (normalised) image."""
    red = images[:, 0].mean(dim=(1, 2)) > images[:, 2].mean(dim=(1, 2))  # [B]
    says_red = torch.tensor(["red" in c for c in captions])
    says_blue = torch.tensor(["blue" in c for c in captions])
    return (red & says_red).float() + (~red & says_blue).float() + 0.01 * torch.tensor([len(c) for c in captions])


def test_flickr8k_best_caption_scored_against_its_own_image(tmp_path: Path) -> None:
    save_image(tmp_path / "r.jpg", (250, 10, 10))
    save_image(tmp_path / "b.jpg", (10, 10, 250))
    caps = ["a long caption about a cat", "a red thing", "a blue thing", "x", "y"]
    entries = [{"image": "r.jpg", "caption": caps}, {"image": "b.jpg", "caption": caps}, {"image": "gone.jpg", "caption": caps}]
    (tmp_path / "en_val.json").write_text(json.dumps(entries))
    rows = read_flickr8k(tmp_path / "en_val.json")
    assert [r["key"] for r in rows] == ["r.jpg", "b.jpg", "gone.jpg"] and rows[0]["candidates"] == caps
    scores = score_rows(rows, PRE, colour_score, batch_size=3)
    assert scores[2] is None and len(scores[0]) == 5
    chosen = choose_best_captions(rows, scores)
    assert chosen[0]["caption"] == "a red thing" and chosen[1]["caption"] == "a blue thing"
    assert "skip" in chosen[2]


def _flickr8k_captions(path: Path, choice: str, **kwargs) -> dict:
    source = Flickr8kDataset(str(path), caption_choice=choice, **kwargs)
    source.use_transforms(ModelTransforms.of(PRE, TRANSFORMS.tokenizer, colour_score))
    source.prepare(None, None, batch_size=8, num_workers=0)
    return {r["key"]: r.get("skip", r["caption"]) for r in source.rows}


def test_flickr8k_nib_code_scores_captions_against_the_first_image_of_the_batch(tmp_path: Path) -> None:
    """NIB's code (REFERENCE_NOTES §8) compares each row's captions with the first image of its batch of 32:
    "nib_code" reproduces that, "own" (the default) scores every row against its own image."""
    save_image(tmp_path / "r.jpg", (250, 10, 10))
    save_image(tmp_path / "b.jpg", (10, 10, 250))
    caps = ["a red thing", "a blue thing", "x", "y", "z"]
    # 34 rows: batch 1 = rows 0-31 (first image red), batch 2 = rows 32-33 (first image blue)
    names = ["r.jpg"] + ["b.jpg"] * 31 + ["b.jpg", "r.jpg"]
    (tmp_path / "en_val.json").write_text(json.dumps([{"image": n, "caption": caps} for n in names]))
    keys = [r["key"] for r in read_flickr8k(tmp_path / "en_val.json")]
    own = [_flickr8k_captions(tmp_path / "en_val.json", "own")[k] for k in keys]
    nib = [_flickr8k_captions(tmp_path / "en_val.json", "nib_code")[k] for k in keys]
    assert own == ["a red thing"] + ["a blue thing"] * 32 + ["a red thing"]  # each against its own image
    assert nib == ["a red thing"] * 32 + ["a blue thing"] * 2  # batch 1 against red row 0, batch 2 against blue row 32
    nib = dict(zip(keys, nib))
    assert list(_flickr8k_captions(tmp_path / "en_val.json", "best").values()) == own  # "best" = "own"
    # batches are counted over the whole file, whatever rows a sample keeps: row 33 still follows row 32's image
    from clipib.data.sources.rows import Selection

    sampled = _flickr8k_captions(tmp_path / "en_val.json", "nib_code", selection=Selection(sample=3, sample_seed=0))
    assert all(nib[k] == v for k, v in sampled.items()) and len(sampled) == 3
    # a batch whose first image is missing: its rows become skips under "nib_code" only
    names[32] = "gone.jpg"
    (tmp_path / "en_val.json").write_text(json.dumps([{"image": n, "caption": caps} for n in names]))
    nib = _flickr8k_captions(tmp_path / "en_val.json", "nib_code")
    assert "could not be scored" in nib["r.jpg#33"] and _flickr8k_captions(tmp_path / "en_val.json", "own")["r.jpg#33"] == "a red thing"
    with pytest.raises(ValueError, match="caption_choice"):
        Flickr8kDataset(str(tmp_path / "en_val.json"), caption_choice="nib")


def test_folders_prompt_per_class_synonyms(tmp_path: Path) -> None:
    for cls in ("n001", "n002"):
        for i in range(3):
            save_image(tmp_path / "train" / cls / "images" / f"{cls}_{i}.JPEG")
    (tmp_path / "words.txt").write_text("n001\tgoldfish, Carassius auratus\n")
    rows = read_folders(tmp_path / "train", per_class=2, synonyms=tmp_path / "words.txt")
    assert [r["key"] for r in rows] == [
        "n001/images/n001_0.JPEG", "n001/images/n001_1.JPEG", "n002/images/n002_0.JPEG", "n002/images/n002_1.JPEG"
    ]
    assert rows[0]["caption"] == "a photo of a goldfish, Carassius auratus" and rows[2]["caption"] == "a photo of a n002"
    assert not any("skip" in r for r in rows)


def test_folders_from_tiny_imagenet_val_annotations(tmp_path: Path) -> None:
    for i in range(4):
        save_image(tmp_path / "val" / "images" / f"val_{i}.JPEG")
    (tmp_path / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn002\t0\t0\t5\t5\nval_1.JPEG\tn001\t0\t0\t5\t5\nval_2.JPEG\tn002\t1\t1\t4\t4\nval_3.JPEG\tn001\t0\t0\t1\t1\n"
    )
    rows = read_folders(tmp_path / "val", template="an image of {}", per_class=1,
                        synonyms={"n001": "goldfish"}, annotations=tmp_path / "val" / "val_annotations.txt")
    assert [(r["key"], r["caption"]) for r in rows] == [("images/val_1.JPEG", "an image of goldfish"), ("images/val_0.JPEG", "an image of n002")]


def test_table_sources_read_their_format(tmp_path: Path) -> None:
    """Each format's source, from its own arguments: the same rows as its reader, decoded on demand."""
    save_image(tmp_path / "a.png")
    (tmp_path / "cc.tsv").write_text("caption\timage\na cat\ta.png\nlost\tnone.png\n")
    (tmp_path / "t.csv").write_text("caption,file_path\na cat,a.png\n")
    save_image(tmp_path / "classes" / "n1" / "x.png")
    for source, keys in ((TsvDataset(str(tmp_path / "cc.tsv"), header=True), ["0", "1"]),
                         (CsvDataset(str(tmp_path / "t.csv")), ["0"]),
                         (FolderDataset(str(tmp_path / "classes"), prompt="{}"), ["n1/x.png"])):
        source.use_transforms(TRANSFORMS)
        source.prepare(None, None, batch_size=2, num_workers=0)
        assert [source[i]["key"] for i in range(len(source))] == keys
        assert tuple(source[0]["image"].shape) == (3, 32, 32)


def test_excluded_rows_are_never_decoded(tmp_path: Path, monkeypatch) -> None:
    """A resumed run: excluded rows (a skip among them) are neither decoded, yielded nor reported."""
    import clipib.data.common as common

    for i in range(5):
        save_image(tmp_path / f"{i}.png")
    lines = "".join(f"picture {i},{i}.png\n" for i in range(5))
    (tmp_path / "t.csv").write_text("caption,file_path\n" + lines + "lost,missing.png\n")
    decoded: List[str] = []
    real = common.decode_image
    monkeypatch.setattr(common, "decode_image", lambda path: decoded.append(str(path)) or real(path))
    source = CsvDataset(str(tmp_path / "t.csv"))
    source.use_transforms(TRANSFORMS)
    source.exclude({"1", "3", "5"})  # "5" is the missing file: not reported as a skip either
    source.prepare(None, None, batch_size=2, num_workers=0)
    items = [source[i] for i in range(len(source))]
    assert [it["key"] for it in items] == ["0", "2", "4"] and not any("skip" in it for it in items)
    assert sorted(decoded) == [str(tmp_path / f"{i}.png") for i in (0, 2, 4)]
    assert source.info == {"rows": 6, "excluded": 3}
