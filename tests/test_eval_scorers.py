"""pickscore and aesthetic against their sources' own lines, the rule scorer against the synthetic sets' labels, and
how every scorer finds and reads its weights.

PickScore's model card (huggingface.co/yuvalkirstain/PickScore_v1, "How to Get Started with the Model"):
    processor = AutoProcessor.from_pretrained(processor_name_or_path)
    model = AutoModel.from_pretrained(model_pretrained_name_or_path).eval().to(device)
    image_inputs = processor(images=images, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
    text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
    with torch.no_grad():
        image_embs = model.get_image_features(**image_inputs)
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs)
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]

DiffusionDPO's utils/aes_utils.py (SalesforceAIResearch/DiffusionDPO@dff8e10), Selector:
    self.model = MLP(768)  # CLIP embedding dim is 768 for CLIP ViT L 14
    s = torch.load("aesthetics_model/sac+logos+ava1-l14-linearMSE.pth")
    self.model.load_state_dict(s)
    clip_model_name = "openai/clip-vit-large-patch14"
    self.model2 = AutoModel.from_pretrained(clip_model_name).eval().to(device)
    self.processor = AutoProcessor.from_pretrained(clip_model_name)
    def score(self, images, prompt_not_used):
        image_inputs = self.processor(images=images, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            image_embs = self.model2.get_image_features(**image_inputs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            return self.model(image_embs).cpu().flatten().tolist()

Two adaptations to today's transformers, both as the issue describes: get_*_features return an output object on
transformers 5 (`.pooler_output` holds the tensor), and AutoProcessor is asked for its PIL backend, the only one
the card's transformers had (transformers 5 picks torchvision's when it can import it, which these tests do).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from embedded.synthetic import DEFECTS_FILE, render_image
from evaluation.scorers import SCORERS, load, resolve, scorer_class
from evaluation.scorers.base import read_state_dict
from evaluation.scorers.rule import rule_score
from schemas.errors import InputError

PROMPTS = ["a red cube", "a blue ball on a table", "a photo of a big pink diamond", "café ☕ yellow box"]


def _images() -> list[Image.Image]:
    rng = random.Random(3)
    return [
        Image.open(io.BytesIO(render_image(rng, obj, colour, colour, washed_out=i == 2).jpeg)).convert("RGB")
        for i, (obj, colour) in enumerate(
            (("cube", "red"), ("ball", "blue"), ("diamond", "pink"), ("box", "cyan"))
        )
    ]


def _features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def model_card_scores(folder: Path, prompt: str, images: list[Image.Image]) -> list[float]:
    from transformers import AutoModel, AutoProcessor

    device = "cpu"
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    model = AutoModel.from_pretrained(folder).eval().to(device)
    image_inputs = processor(
        images=images, padding=True, truncation=True, max_length=77, return_tensors="pt"
    ).to(device)
    text_inputs = processor(
        text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt"
    ).to(device)
    with torch.no_grad():
        image_embs = _features(model.get_image_features(**image_inputs))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = _features(model.get_text_features(**text_inputs))
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
    return scores.tolist()


def test_pickscore_is_the_model_cards(tiny_pickscore: Path) -> None:
    source = resolve(f"pickscore={tiny_pickscore}")
    assert (source.name, source.version) == ("pickscore", "PickScore_tiny")
    assert source.files["processor"] == tiny_pickscore  # a local folder with its own processor uses it
    ours = load(source, "cpu").score(_images(), PROMPTS)
    theirs = [
        model_card_scores(tiny_pickscore, p, [img])[0] for img, p in zip(_images(), PROMPTS, strict=True)
    ]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert np.ptp(theirs) > 1e-3


class AesUtilsMLP(nn.Module):
    """aes_utils.py's MLP, as there (the training-only methods left out)."""

    def __init__(self, input_size, xcol="emb", ycol="avg_rating"):
        super().__init__()
        self.input_size = input_size
        self.xcol = xcol
        self.ycol = ycol
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024),
            # nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            # nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            # nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            # nn.ReLU(),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def aes_utils_scores(mlp_file: Path, clip_folder: Path, images: list[Image.Image]) -> list[float]:
    from transformers import AutoModel, AutoProcessor

    model = AesUtilsMLP(768)
    s = torch.load(mlp_file)
    model.load_state_dict(s)
    model.eval()
    model2 = AutoModel.from_pretrained(clip_folder).eval()
    processor = AutoProcessor.from_pretrained(clip_folder, backend="pil")
    image_inputs = processor(images=images, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = _features(model2.get_image_features(**image_inputs))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        return model(image_embs).cpu().flatten().tolist()


def test_aesthetic_is_diffusion_dpos(tiny_aesthetic: Path) -> None:
    source = resolve(f"aesthetic={tiny_aesthetic}")
    assert (source.name, source.version) == ("aesthetic", "sac+logos+ava1-l14-linearMSE")
    assert source.files["clip"] == tiny_aesthetic.parent  # the CLIP folder beside the MLP
    ours = load(source, "cpu").score(_images(), PROMPTS)
    theirs = aes_utils_scores(tiny_aesthetic, tiny_aesthetic.parent, _images())
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert np.ptp(theirs) > 1e-4


def _decided_rows(split: Path) -> list[tuple[str, bytes, bytes, int]]:
    """(caption, winner JPEG, loser JPEG, ranking_id) of every row with a preference."""
    rows = []
    for file in sorted(split.glob("*.parquet")):
        for r in pq.read_table(file).to_pylist():
            if r["label_0"] != 0.5:
                won, lost = ("jpg_0", "jpg_1") if r["label_0"] == 1.0 else ("jpg_1", "jpg_0")
                rows.append((r["caption"], r[won], r[lost], r["ranking_id"]))
    return rows


def test_rule_ranks_every_synthetic_winner_above_its_loser(synthetic_parquet: Path) -> None:
    """On both splits of a real synthetic set, every decided row; and the score reads the defect: flawless ~2,
    washed out ~1, another colour ~0."""
    rule = load(resolve("rule"))
    checked = 0
    for split in ("train", "validation"):
        defects = json.loads((synthetic_parquet / split / DEFECTS_FILE).read_text())
        for caption, won, lost, ranking_id in _decided_rows(synthetic_parquet / split):
            images = [Image.open(io.BytesIO(j)).convert("RGB") for j in (won, lost)]
            winner, loser = rule.score(images, [caption, caption])
            assert winner > loser, (split, ranking_id, caption, winner, loser)
            assert winner > 1.5, (ranking_id, winner)
            defect = defects[str(ranking_id)]
            assert (0.5 < loser < 1.5) if defect == "contrast" else (loser < 0.5), (ranking_id, defect, loser)
            checked += 1
    assert checked > 120  # of the fixture's 160 rows, ~11% are ties


def test_rule_needs_a_palette_colour_in_the_prompt() -> None:
    rule = load(resolve("rule"))
    with pytest.raises(InputError, match="names none of the palette colours"):
        rule.score(_images()[:1], ["a cube"])
    assert rule_score(Image.new("RGB", (64, 64), (128, 128, 128)), 0) == 0.0  # no object at all


def test_a_scorer_is_a_batch_callable_for_ray(tmp_path: Path) -> None:
    """The Ray Data shape: a dict of columns in ("path", "prompt", anything else), the same plus "score" out."""
    paths = []
    for i, img in enumerate(_images()):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    batch = {"path": np.array(paths), "prompt": np.array(PROMPTS), "prompt_id": np.arange(4)}
    out = load(resolve("rule"))(batch)
    assert set(out) == {"path", "prompt", "prompt_id", "score"}
    assert out["score"].dtype == np.float64 and out["score"].shape == (4,)
    np.testing.assert_array_equal(out["prompt_id"], np.arange(4))


class NotATensor:
    """Stands for anything a pickle could carry besides tensors (code runs on unpickling it)."""


def test_weights_are_read_without_running_pickled_code(tmp_path: Path) -> None:
    evil = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": NotATensor()}, evil)
    with pytest.raises(InputError, match="not a loadable weights file"):
        read_state_dict(evil)
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, plain)
    assert read_state_dict(plain)["w"].tolist() == [1.0, 1.0]  # HPSv2's {"state_dict": ...} is unwrapped


def test_scorer_arguments_that_cannot_work_are_refused(
    tmp_path: Path, open_clip_scorers: dict[str, Path]
) -> None:
    with pytest.raises(InputError, match="unknown scorer 'imagereward'"):
        scorer_class("imagereward")
    renamed = tmp_path / "hps.pt"
    renamed.write_bytes(open_clip_scorers["v2.0"].read_bytes())
    with pytest.raises(InputError, match=r"cannot tell the HPS version of hps\.pt"):
        resolve(f"hps={renamed}")
    with pytest.raises(InputError, match=r"sac\+logos\+ava1-l14-linearMSE.pth"):
        resolve("aesthetic")
    with pytest.raises(InputError, match="takes no weights"):
        resolve("rule=x")
    with pytest.raises(InputError, match="no such file or folder"):
        resolve(f"pickscore={tmp_path / 'missing'}")
    assert set(SCORERS) == {"pickscore", "hps", "clip", "aesthetic", "rule"}
