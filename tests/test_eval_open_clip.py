"""The hps and clip scorers (open_clip checkpoints on transformers' CLIPModel) against open_clip itself.

Oracle: open_clip 3.3.0 (pyproject.toml's test-oracle, in .venv/oracle) builds the model, loads the weights and
tokenizes, and torchvision's functional ops preprocess, arranged as the HPSv2 repository does (tgxs002/HPSv2@866735e):

hpsv2/img_score.py, score():
    checkpoint = torch.load(cp, map_location=device)
    model.load_state_dict(checkpoint['state_dict'])
    tokenizer = get_tokenizer('ViT-H-14')
    image = preprocess_val(one_img_path).unsqueeze(0).to(device=device, non_blocking=True)
    text = tokenizer([prompt]).to(device=device, non_blocking=True)
    outputs = model(image, text)
    image_features, text_features = outputs["image_features"], outputs["text_features"]
    logits_per_image = image_features @ text_features.T
    hps_score = torch.diagonal(logits_per_image).cpu().numpy()

hpsv2/src/open_clip/factory.py, create_model_and_transforms(..., light_augmentation=True):
    preprocess_val = image_transform(model.visual.image_size, is_train=False, mean=image_mean, std=image_std,
                                     resize_longest_max=True)
hpsv2/src/open_clip/transform.py, image_transform(is_train=False): [_convert_to_rgb_or_rgba, ToTensor(),
    ResizeMaxSize(image_size, fill=fill_color), normalize]  (fill_color=0; normalize: Normalize(mean, std) on RGB)
ResizeMaxSize.forward (interpolation=InterpolationMode.BICUBIC):
    scale = self.max_size / float(max(height, width))
    if scale != 1.0:
        new_size = tuple(round(dim * scale) for dim in (height, width))
        img = F.resize(img, new_size, self.interpolation)
        pad_h = self.max_size - new_size[0]
        pad_w = self.max_size - new_size[1]
        img = F.pad(img, padding=[pad_w//2, pad_h//2, pad_w - pad_w//2, pad_h - pad_h//2], fill=self.fill)

DiffusionDPO's utils/clip_utils.py (SalesforceAIResearch/DiffusionDPO@dff8e10) runs the same lines with
create_model_and_transforms('ViT-H-14', 'laion2B-s32B-b79K', ..., light_augmentation=True) and no HPS checkpoint.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedded.synthetic import render_image
from evaluation.scorers import load, resolve
from evaluation.scorers.clip_h import clean_prompt, hps_pixels
from evaluation.scorers.open_clip_weights import clip_config, transformers_state_dict
from schemas.errors import InputError
from tests.fixtures.image_zoo import torchvision_transforms
from tests.fixtures.scorer_models import PREPROCESS_CFG, TINY_OPEN_CLIP, open_clip_module

PROMPTS = [
    "a red cube",
    "A  Photo of a BIG blue ball,\n studio lighting",
    "fish &amp; chips &lt;3, café ☕ 日本語",
    " ".join(["a green pyramid floating in space"] * 20),  # over 77 tokens: truncated, end-of-text kept
]


def _images() -> list[Image.Image]:
    """Synthetic renders: square, portrait and landscape, and one smaller than the model's input (upscaled)."""
    rng = random.Random(7)
    images = [
        Image.open(io.BytesIO(render_image(rng, obj, colour, colour, washed_out=False).jpeg)).convert("RGB")
        for obj, colour in (("cube", "red"), ("ball", "blue"), ("diamond", "pink"))
    ]
    return [*images, images[0].resize((40, 27))]


def hpsv2_preprocess_val(image: Image.Image, image_size: int, mean, std) -> torch.Tensor:
    """The quoted HPSv2 transform, on torchvision's functional ops."""
    F = torchvision_transforms().functional
    img = F.to_tensor(image.convert("RGB"))
    height, width = img.shape[1:]
    scale = image_size / float(max(height, width))
    if scale != 1.0:
        new_size = tuple(round(dim * scale) for dim in (height, width))
        img = F.resize(img, new_size, torchvision_transforms().InterpolationMode.BICUBIC)
        pad_h = image_size - new_size[0]
        pad_w = image_size - new_size[1]
        img = F.pad(img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return F.normalize(img, mean=mean, std=std)


def hpsv2_scores(model, images: list[Image.Image], prompts: list[str], tokenizer) -> np.ndarray:
    """HPSv2's score() per image, as quoted (fp32: autocast is a no-op on CPU)."""
    image_size = model.visual.image_size[0]
    out = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            pixels = hpsv2_preprocess_val(image, image_size, PREPROCESS_CFG["mean"], PREPROCESS_CFG["std"])
            outputs = model(pixels.unsqueeze(0), tokenizer([prompt]))
            image_features, text_features = outputs["image_features"], outputs["text_features"]
            logits_per_image = image_features @ text_features.T
            out.append(torch.diagonal(logits_per_image).cpu().numpy()[0])
    return np.array(out)


def test_hps_preprocessing_is_hpsv2s_transform() -> None:
    for image in _images():
        ours = hps_pixels([image], 224, PREPROCESS_CFG["mean"], PREPROCESS_CFG["std"])[0]
        theirs = hpsv2_preprocess_val(image, 224, PREPROCESS_CFG["mean"], PREPROCESS_CFG["std"])
        assert ours.shape == theirs.shape == (3, 224, 224)
        assert torch.allclose(ours, theirs, atol=1e-6), (image.size, (ours - theirs).abs().max())


def test_tokens_are_open_clips(open_clip_scorers: dict[str, Path]) -> None:
    """The tokenizer files of the fixture are open_clip's tables; tokenizing with them as the scorers do gives
    open_clip's ids up to the end-of-text token (what the text tower pools; after it, causal attention ignores)."""
    from transformers import CLIPTokenizer

    theirs = open_clip_module().get_tokenizer("ViT-H-14")(PROMPTS)
    tokenizer = CLIPTokenizer.from_pretrained(open_clip_scorers["clip"])
    cleaned = [clean_prompt(p) for p in PROMPTS]
    ours = tokenizer(
        cleaned, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
    ).input_ids
    eot = theirs.argmax(
        -1
    )  # open_clip pads with 0 after the end-of-text token, transformers with end-of-text
    for row, end in enumerate(eot.tolist()):
        assert ours[row, : end + 1].tolist() == theirs[row, : end + 1].tolist(), PROMPTS[row]
    assert eot[-1] == 76  # the long prompt is cut, its last token the end of text


@pytest.mark.parametrize("version", ["v2.0", "v2.1"])
def test_hps_scores_are_hpsv2s(open_clip_scorers: dict[str, Path], version: str) -> None:
    checkpoint = open_clip_scorers[version]
    source = resolve(f"hps={checkpoint}")
    assert (source.name, source.version) == ("hps", version)  # read off HPSv2's file name
    ours = np.array(load(source, "cpu").score(_images(), PROMPTS))

    oc = open_clip_module()
    model = oc.model.CLIP(**TINY_OPEN_CLIP, output_dict=True).eval()
    model.load_state_dict(torch.load(checkpoint, map_location="cpu")["state_dict"])
    theirs = hpsv2_scores(model, _images(), PROMPTS, oc.get_tokenizer("ViT-H-14"))
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    assert np.ptp(theirs) > 1e-3  # the scores differ between images: the comparison is not of constants


def test_clip_scores_are_diffusion_dpos(open_clip_scorers: dict[str, Path]) -> None:
    """`clip` against open_clip's own loading of a LAION-layout folder (local-dir: reads open_clip_config.json and
    open_clip_model.safetensors, as hf-hub: does for laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."""
    folder = open_clip_scorers["clip"]
    source = resolve(f"clip={folder}")
    assert (source.name, source.version) == ("clip", folder.name)
    ours = np.array(load(source, "cpu").score(_images(), PROMPTS))

    oc = open_clip_module()
    model, _, _ = oc.create_model_and_transforms(f"local-dir:{folder}", output_dict=True)
    theirs = hpsv2_scores(model.eval(), _images(), PROMPTS, oc.get_tokenizer(f"local-dir:{folder}"))
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    assert np.ptp(theirs) > 1e-3


def test_vit_h_14_maps_at_full_size() -> None:
    """open_clip's real ViT-H-14 (built on the meta device: shapes only) maps key for key, shape for shape, onto
    the CLIPModel of the config derived from open_clip's own ViT-H-14 model config."""
    from transformers import CLIPModel

    oc = open_clip_module()
    with torch.device("meta"):
        theirs = oc.create_model("ViT-H-14", device="meta").state_dict()
        ours = CLIPModel(clip_config(oc.get_model_config("ViT-H-14"), 49407, "ViT-H-14")).state_dict()
    mapped = transformers_state_dict(theirs, "ViT-H-14")
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    config = clip_config(oc.get_model_config("ViT-H-14"), 49407, "ViT-H-14")
    assert config.vision_config.num_attention_heads == 16  # 1280 / head_width 80, which no shape shows
    assert config.text_config.num_attention_heads == 16


def test_open_clip_options_it_cannot_map_are_refused() -> None:
    cfg = {**TINY_OPEN_CLIP, "vision_cfg": {**TINY_OPEN_CLIP["vision_cfg"], "ls_init_value": 1e-5}}
    with pytest.raises(InputError, match="ls_init_value"):
        clip_config(cfg, 49407, "cfg")
    with pytest.raises(InputError, match="not a key of an open_clip ViT CLIP"):
        transformers_state_dict({"visual.trunk.stem.weight": torch.zeros(1)}, "ckpt")
