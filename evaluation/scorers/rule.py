"""`rule`: the embedded default's preference rule (embedded/synthetic.py) read off an image, in [0, 2].

The synthetic preference: the caption names a palette colour; the preferred image's large object has it at full
strength, and a loser's object has another palette colour or the caption's washed out halfway towards the flat grey
background. So the background is the median of the border pixels (the object is centred and covers 35-60% of the
image), every pixel gets the nearest of: that background, the 8 palette colours at full strength, and the 8 washed out
towards this background; and the score is

    2 x (share of the object's pixels at the caption's colour, full strength) + 1 x (share of them washed out),

about 2 for a flawless image, 1 for a washed-out one, 0 for another colour or no object. The share is of at least
a tenth of the image, so a few stray pixels of an otherwise empty image cannot score high; a small distractor of
another colour lowers a flawless image's score a little (never below ~1.75), never a loser's above ~1.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from embedded.synthetic import COLOURS
from evaluation.scorers.base import Scorer, Source
from schemas.errors import InputError

VERSION = "1"  # bump when the score's definition changes: scores of two versions do not compare
MAX_SIDE = 256  # images are read at most this large (nearest neighbour keeps colours unblended)
BORDER = 0.02  # the frame the background is read from, as a share of the shorter side
MIN_OBJECT_SHARE = 0.1
PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # [8, 3]
COLOUR_WORD = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")


def caption_colour(prompt: str) -> int:
    """Index in COLOURS of the first palette colour the prompt names."""
    match = COLOUR_WORD.search(prompt.lower())
    if match is None:
        raise InputError(
            f"rule scorer: the prompt {prompt!r} names none of the palette colours {list(COLOURS)}"
        )
    return list(COLOURS).index(match[1])


def rule_score(image: Image.Image, colour: int) -> float:
    """The score of one RGB image against the palette colour with index `colour`."""
    if max(image.size) > MAX_SIDE:
        scale = MAX_SIDE / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.NEAREST)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    frame = max(1, round(BORDER * min(pixels.shape[:2])))
    border = np.concatenate(
        [
            pixels[:frame].reshape(-1, 3),
            pixels[-frame:].reshape(-1, 3),
            pixels[:, :frame].reshape(-1, 3),
            pixels[:, -frame:].reshape(-1, 3),
        ]
    )
    background = np.median(border, axis=0)
    # candidates: 0 background, 1..8 full strength, 9..16 washed out as synthetic.py draws it ((c + bg) // 2)
    candidates = np.concatenate([background[None], PALETTE, np.floor((PALETTE + background) / 2)])
    flat = pixels.reshape(-1, 3)
    # argmin over candidates c of |p - c|² = |p|² - 2 p·c + |c|², whose first term is the same for every c
    nearest = ((candidates**2).sum(1)[None] - 2 * flat @ candidates.T).argmin(1)
    counts = np.bincount(nearest, minlength=len(candidates))
    object_pixels = max(int(counts[1:].sum()), MIN_OBJECT_SHARE * len(flat))
    full, washed = counts[1 + colour], counts[1 + len(PALETTE) + colour]
    return float((2 * full + washed) / object_pixels)


class Rule(Scorer):
    """`rule` (no weights): see the module docstring."""

    name = "rule"

    @classmethod
    def resolve(cls, arg: str | None) -> Source:
        if arg:
            raise InputError(f"--scorer rule={arg}: the rule scorer takes no weights; pass --scorer rule")
        return Source(cls.name, VERSION, "embedded.synthetic rule")

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        return [rule_score(img, caption_colour(p)) for img, p in zip(images, prompts, strict=True)]
