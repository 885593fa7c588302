"""Insertion / deletion AUC (InputIBA App. D.3) on synthetic cases with a known object."""
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision.transforms import Compose, Normalize

from clipib.attribution import Attribution
from clipib.metrics import (
    InsertionDeletion,
    blur_params,
    blurred_canvas,
    deletion_fill,
    image_insertion_deletion,
    text_insertion_deletion,
)

G = torch.Generator().manual_seed(0)
B, H, W = 3, 16, 16
IMAGES = torch.randn(B, 3, H, W, generator=G)
OBJ = torch.zeros(B, H, W, dtype=torch.bool)
OBJ[:, 4:10, 5:12] = True
OPENAI, OPENAI_STD = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD


def _object_score(x):
    """Similarity of the object region with the original object (1 = intact)."""
    a = (x * OBJ[:, None]).flatten(1)
    b = (IMAGES * OBJ[:, None]).flatten(1)
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def _maps():
    noise = 0.5 * torch.rand(B, H, W, generator=torch.Generator().manual_seed(1))
    good = OBJ.float() + noise  # ranks every object pixel first
    return good, -good  # reversal


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_image_object_first_beats_reversal(mode):
    good, bad = _maps()
    auc_good = image_insertion_deletion(IMAGES, good, _object_score, mode, steps=10, mean=OPENAI, std=OPENAI_STD)[0]
    auc_bad = image_insertion_deletion(IMAGES, bad, _object_score, mode, steps=10, mean=OPENAI, std=OPENAI_STD)[0]
    if mode == "deletion":
        assert (auc_good < auc_bad - 0.1).all()
    else:
        assert (auc_good > auc_bad + 0.1).all()


def test_image_curve_endpoints_fill_and_canvas():
    seen = []
    good, _ = _maps()
    image_insertion_deletion(IMAGES, good, lambda x: seen.append(x.clone()) or x.new_zeros(B), "deletion", steps=4,
                             mean=OPENAI, std=OPENAI_STD)
    black = deletion_fill("black", mean=OPENAI, std=OPENAI_STD)
    assert torch.equal(seen[0], IMAGES)
    assert torch.allclose(seen[-1], black.expand_as(IMAGES))
    assert torch.allclose(black.flatten(), torch.tensor([-0.48145466 / 0.26862954, -0.4578275 / 0.26130258,
                                                         -0.40821073 / 0.27577711]))
    seen.clear()
    _, fr, curves = image_insertion_deletion(IMAGES, good, lambda x: seen.append(x.clone()) or x.new_zeros(B),
                                             "insertion", steps=4)
    assert torch.allclose(seen[0], blurred_canvas(IMAGES)) and torch.equal(seen[-1], IMAGES)
    assert fr.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and curves.shape == (B, 5)
    # step 1 reveals the top quarter of the pixels (64 of 256), all inside the 42-px object first
    revealed = (seen[1] == IMAGES).all(1)
    assert revealed.sum().item() == B * 64 and revealed[OBJ].all()


def test_blur_scales_with_input_size():
    assert blur_params(224, 224) == ([29, 29], [15.0, 15.0])
    k, s = blur_params(448, 112)
    assert k == [15, 57] and s == [7.5, 30.0]
    assert blur_params(32, 64)[0] == [9, 5]
    assert blurred_canvas(torch.randn(1, 3, 8, 8)).shape == (1, 3, 8, 8)  # kernel clipped to the size


def test_text_gold_first_beats_reversal_and_keeps_sot_eot():
    ids = torch.tensor([[49406, 11, 12, 13, 14, 15, 49407, 0], [49406, 21, 22, 23, 49407, 0, 0, 0]])
    gold = torch.tensor([[0, 0, 1, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]]).bool()

    def score(x):
        assert (x[:, 0] == 49406).all() and (x.gather(1, torch.tensor([[6], [4]])) == 49407).all()
        assert (x[0, 7] == 0) and (x[1, 5:] == 0).all()
        return ((x == ids) & gold).sum(1).double() / gold.sum(1)

    good = gold.float() + 0.1 * torch.arange(8.0)
    for mode in ("deletion", "insertion"):
        a_good = text_insertion_deletion(ids, good, score, mode, steps=4, replacement_id=7)[0]
        a_bad = text_insertion_deletion(ids, -good, score, mode, steps=4, replacement_id=7)[0]
        assert ((a_good < a_bad) if mode == "deletion" else (a_good > a_bad)).all()
    seen = []
    text_insertion_deletion(ids, good, lambda x: seen.append(x.clone()) or torch.zeros(2), "deletion", 1, 7)
    assert seen[1].tolist() == [[49406, 7, 7, 7, 7, 7, 49407, 0], [49406, 7, 7, 7, 49407, 0, 0, 0]]


def test_black_needs_the_model_normalisation():
    with pytest.raises(ValueError, match="normalisation"):
        deletion_fill("black")
    with pytest.raises(ValueError, match="normalisation"):
        image_insertion_deletion(IMAGES, _maps()[0], _object_score, "deletion", steps=2)


def test_black_is_the_loaded_models_black(tiny_clip, pairs):
    """The eval metric deletes to black in the model's own normalisation, not OpenAI's (the bug of issue 12)."""
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
    clip = type(tiny_clip)(tiny_clip.model, Compose([Normalize(mean, std)]), tiny_clip.tokenizer, name="gray")
    assert clip.normalization == (mean, std)
    images, ids = pairs
    seen = []
    encode = clip.image.encode
    clip.image.encode = lambda x: seen.append(x.clone()) or encode(x)  # record what the curve scores
    try:
        attr = Attribution(image=torch.rand(images.shape[0], *images.shape[-2:]))
        InsertionDeletion(steps=2, fill="black").update(clip, {"image": images, "ids": ids}, attr, "image")
    finally:
        del clip.image.encode
    black = torch.tensor([-m / s for m, s in zip(mean, std)])[:, None, None]  # pixel 0 through the model's Normalize
    deleted = [x for x in seen if torch.allclose(x, black.expand_as(x))]
    assert len(deleted) == 1  # the last deletion step: every pixel black in the model's normalisation
    assert not torch.allclose(black.flatten(), deletion_fill("black", mean=OPENAI, std=OPENAI_STD).flatten())


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        InsertionDeletion(steps=0)
    with pytest.raises(ValueError, match="fill"):
        InsertionDeletion(fill="grey")
    with pytest.raises(ValueError, match="mode"):
        image_insertion_deletion(IMAGES, _maps()[0], _object_score, "sideways")
    with pytest.raises(ValueError, match="maps must be"):
        image_insertion_deletion(IMAGES, torch.rand(B, 4, 4), _object_score)
