"""An open_clip ViT checkpoint (HPSv2's, LAION's CLIP-H) as a transformers CLIPModel, without open_clip.

Why: open_clip imports torchvision, which cannot live in this project's environment (pyproject.toml's test-oracle
note says why), and the HPSv2 package pins pytest and ships without its tokenizer vocabulary. The two models are the
same network: open_clip's `VisionTransformer` / text `Transformer` blocks are pre-norm blocks with a fused
`in_proj` attention and a GELU MLP, which transformers' CLIP encoder layers compute with separate q/k/v projections.
The architecture comes from open_clip's own model config (`open_clip_config.json`'s "model_cfg", as LAION's hub repos
ship it); tests/test_eval_open_clip.py checks features and scores against open_clip itself.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from schemas.errors import InputError

# open_clip model_cfg keys this mapping reproduces; any other option (layer scale, attentional pooling, timm or HF
# towers, ...) changes the network, so it is refused rather than silently ignored.
VISION_KEYS = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size"}
TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
# open_clip's CLIPVisionCfg / CLIPTextCfg defaults for the keys above (open_clip/model.py)
VISION_DEFAULTS = {
    "layers": 12,
    "width": 768,
    "head_width": 64,
    "mlp_ratio": 4.0,
    "patch_size": 16,
    "image_size": 224,
}
TEXT_DEFAULTS = {
    "context_length": 77,
    "vocab_size": 49408,
    "width": 512,
    "heads": 8,
    "layers": 12,
    "mlp_ratio": 4.0,
}
LAYER_NORM_EPS = 1e-5  # open_clip's LayerNorm is torch's, whose default eps this is

# open_clip block → transformers encoder layer, within one tower
BLOCK_KEYS = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# the layer norms outside the blocks: open_clip module → transformers module
NORMS = {
    "visual.ln_pre": "vision_model.pre_layrnorm",
    "visual.ln_post": "vision_model.post_layernorm",
    "ln_final": "text_model.final_layer_norm",
}
# everything outside the blocks: open_clip key → (transformers key, transposed)
TOWER_KEYS = {
    "visual.class_embedding": ("vision_model.embeddings.class_embedding", False),
    "visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight", False),
    "visual.conv1.weight": ("vision_model.embeddings.patch_embedding.weight", False),
    "visual.proj": ("visual_projection.weight", True),  # open_clip: x @ proj; nn.Linear: x @ weight.T
    "token_embedding.weight": ("text_model.embeddings.token_embedding.weight", False),
    "positional_embedding": ("text_model.embeddings.position_embedding.weight", False),
    "text_projection": ("text_projection.weight", True),
    "logit_scale": ("logit_scale", False),
    **{f"{oc}.{p}": (f"{hf}.{p}", False) for oc, hf in NORMS.items() for p in ("weight", "bias")},
}
BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
IGNORED = {"attn_mask"}  # the causal mask, a buffer that older open_clip versions saved


def _options(cfg: dict[str, Any], allowed: set[str], defaults: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise InputError(f"{where}: open_clip options {unknown} are not supported (a plain ViT CLIP is)")
    return {**defaults, **cfg}


def clip_config(model_cfg: dict[str, Any], eos_token_id: int, where: str):
    """transformers CLIPConfig of the open_clip `model_cfg` (the "model_cfg" of an open_clip_config.json)."""
    from transformers import CLIPConfig

    _options(model_cfg, TOP_KEYS, {}, where)
    vision = _options(model_cfg.get("vision_cfg", {}), VISION_KEYS, VISION_DEFAULTS, f"{where} vision_cfg")
    text = _options(model_cfg.get("text_cfg", {}), TEXT_KEYS, TEXT_DEFAULTS, f"{where} text_cfg")
    if not isinstance(vision["layers"], int) or vision["width"] % vision["head_width"]:
        raise InputError(f"{where}: vision_cfg {vision} is not a ViT whose width divides into heads")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"

    def tower(cfg: dict[str, Any], heads: int) -> dict[str, Any]:
        return {
            "hidden_size": cfg["width"],
            "intermediate_size": int(cfg["width"] * cfg["mlp_ratio"]),
            "num_hidden_layers": cfg["layers"],
            "num_attention_heads": heads,
            "hidden_act": act,
            "layer_norm_eps": LAYER_NORM_EPS,
            "projection_dim": model_cfg["embed_dim"],
        }

    text_config = {
        **tower(text, text["heads"]),
        "vocab_size": text["vocab_size"],
        "max_position_embeddings": text["context_length"],
        # open_clip pools the text at the first end-of-text token (argmax of the ids, the largest id)
        "eos_token_id": eos_token_id,
    }
    vision_config = {
        **tower(vision, vision["width"] // vision["head_width"]),
        "image_size": vision["image_size"],
        "patch_size": vision["patch_size"],
    }
    return CLIPConfig(
        projection_dim=model_cfg["embed_dim"], text_config=text_config, vision_config=vision_config
    )


def transformers_state_dict(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """open_clip CLIP state dict → CLIPModel state dict (fp32); a key it cannot place is an error."""
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = value.float()
        if key in IGNORED:
            continue
        if key in TOWER_KEYS:
            name, transpose = TOWER_KEYS[key]
            out[name] = value.t().contiguous() if transpose else value
            continue
        match = BLOCK.fullmatch(key)
        if match is None:
            raise InputError(f"{where}: {key!r} is not a key of an open_clip ViT CLIP")
        tower = "vision_model" if match[1] else "text_model"
        prefix, rest = f"{tower}.encoder.layers.{match[2]}", match[3]
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3), strict=True):
                out[f"{prefix}.self_attn.{proj}.{kind}"] = part.contiguous()
            continue
        module, _, param = rest.rpartition(".")
        if module not in BLOCK_KEYS:
            raise InputError(f"{where}: {key!r} is not a key of an open_clip ViT CLIP")
        out[f"{prefix}.{BLOCK_KEYS[module]}.{param}"] = value
    return out


def load_clip_model(state: dict[str, torch.Tensor], model_cfg: dict[str, Any], eos_token_id: int, where: str):
    """A CLIPModel in eval mode holding the open_clip checkpoint `state`; every weight must land."""
    from transformers import CLIPModel

    config = clip_config(model_cfg, eos_token_id, where)
    with torch.device("meta"):
        model = CLIPModel(config)
    weights = transformers_state_dict(state, where)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as e:  # a tensor whose shape differs from the config's
        raise InputError(f"{where}: the checkpoint does not fit its model config ({e})") from e
    if missing or unexpected:
        raise InputError(
            f"{where}: the checkpoint does not fit its model config (missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]})"
        )
    for tower in (model.vision_model.embeddings, model.text_model.embeddings):  # buffers the checkpoint lacks
        tower.position_ids = torch.arange(tower.position_embedding.num_embeddings).expand((1, -1))
    return model.eval().requires_grad_(False)
