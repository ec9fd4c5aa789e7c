"""Caption embeddings, once per unique caption: a callable class Ray runs as an actor. No module-level Ray or
transformers import: the encode driver imports this module only to hand the class to Ray.

SD1.5: the text encoder's last hidden state [77, D], as the official trainer conditions on it.
SDXL: both encoders' penultimate hidden states concatenated on the feature dim [77, D1 + D2], plus encoder 2's
pooled projection `text_embeds` [P], exactly what StableDiffusionXLPipeline.encode_prompt feeds the UNet.
SD3 / FLUX: the family's pipeline's own `encode_prompt`, run with its text encoders alone (no transformer, no VAE
loaded): SD3 [77 + L, D_T5] (CLIP-L ‖ CLIP-G penultimate states zero-padded to T5's width, then T5's states) and
[P_L + P_G] pooled; FLUX [L, D_T5] (T5) and CLIP-L's pooled [D_L]. L is `max_sequence_length`; T5's padding is
attended to (the pipelines pass no mask), so its padded positions depend on the caption and are stored with it.
T5 runs in bf16 on a GPU (it overflows in fp16) and the result is stored in fp16 as for the other families.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from schemas.families import FAMILIES
from schemas.sample import caption_key, encode_tensors, model_family
from stages.encode_latents import default_device, resolve_dtype

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

MAX_LENGTH = 77


class CaptionEncoder:
    """`encode(captions) → {"prompt_embeds": [N, T, D] (+ "pooled_prompt_embeds": [N, P])}` in fp16, T = 77 for
    the CLIP-only families."""

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str | None = None,
        num_threads: int | None = None,
        max_sequence_length: int | None = None,
    ) -> None:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = default_device(device)
        self.family = FAMILIES[model_family(model)]
        if self.family.is_flow:
            self._load_pipeline(model, dtype, max_sequence_length)
            return
        self.dtype = resolve_dtype(dtype, self.device, force_upcast=False)
        self.sdxl = self.family.name == "sdxl"
        self.tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")]
        self.encoders: list[torch.nn.Module] = [
            CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
        ]
        if self.sdxl:
            self.tokenizers.append(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2"))
            self.encoders.append(
                CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")
            )
        for enc in self.encoders:
            enc.to(self.device, self.dtype).eval().requires_grad_(False)

    def _ids(self, tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(
            captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    def _load_pipeline(self, model: str, dtype: str, max_sequence_length: int | None) -> None:
        import diffusers

        auto = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = auto if dtype == "auto" else resolve_dtype(dtype, self.device, force_upcast=False)
        pipeline = getattr(diffusers, self.family.pipeline)
        self.pipeline = pipeline.from_pretrained(model, transformer=None, vae=None, torch_dtype=self.dtype)
        self.pipeline.to(self.device)
        self.max_sequence_length = max_sequence_length or self.family.max_sequence_length

    @torch.no_grad()
    def _encode_with_pipeline(self, captions: list[str]) -> dict[str, torch.Tensor]:
        length = self.max_sequence_length
        if self.family.name == "sd3":
            prompt, _, pooled, _ = self.pipeline.encode_prompt(
                captions,
                None,
                None,
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=length,
            )
        else:
            prompt, pooled, _ = self.pipeline.encode_prompt(
                captions, None, device=self.device, max_sequence_length=length
            )
        return {"prompt_embeds": prompt.half().cpu(), "pooled_prompt_embeds": pooled.half().cpu()}

    @torch.no_grad()
    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.family.is_flow:
            return self._encode_with_pipeline(captions)
        if not self.sdxl:
            hidden = self.encoders[0](self._ids(self.tokenizers[0], captions))[0]
            return {"prompt_embeds": hidden.half().cpu()}
        hiddens, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            out = encoder(self._ids(tokenizer, captions), output_hidden_states=True)
            hiddens.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else None
        return {
            "prompt_embeds": torch.cat(hiddens, dim=-1).half().cpu(),
            "pooled_prompt_embeds": pooled.half().cpu(),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray UDF: {"caption"} → WebDataset columns {"__key__": caption_key, "safetensors": bytes}."""
        captions = [str(c) for c in batch["caption"]]
        tensors = self.encode(captions)
        members = [encode_tensors({k: v[i] for k, v in tensors.items()}) for i in range(len(captions))]
        return {
            "__key__": np.asarray([caption_key(c) for c in captions], dtype=object),
            "safetensors": np.asarray(members, dtype=object),
        }
