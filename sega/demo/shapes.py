"""The demo model's world: flat coloured shapes, their grammar and tokenizer, the renderer and the attribute reader.

Captions follow one grammar, ``a {size} {color} {shape} on a {background} background``. Training also
uses partial captions ("a blue circle", "blue", "on a black background") and empty captions, so that
short SEGA concepts such as ``blue`` or ``black background`` mean something to the model.

The command line (train, eval, sweep) is ``python -m sega.demo``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZES = ("small", "large")
COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
SIZE_RANGE = {"small": (0.25, 0.45), "large": (0.55, 0.80)}  # bounding box side / image side
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
VOCAB_WORDS = ("a", "on", "background", *SIZES, *COLORS, *SHAPES, *BACKGROUNDS)
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "assets" / "shapes-model"


@dataclass(frozen=True)
class ShapeSpec:
    size: str
    color: str
    shape: str
    background: str

    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on a {self.background} background"


def random_spec(rng: np.random.Generator) -> ShapeSpec:
    return ShapeSpec(
        size=SIZES[rng.integers(len(SIZES))],
        color=list(COLORS)[rng.integers(len(COLORS))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
    )


def partial_caption(spec: ShapeSpec, keep: dict[str, bool], bare_background: bool = False) -> str:
    """Caption with only the kept attributes: "a blue circle", "large", "on a black background"..."""
    noun = [getattr(spec, k) for k in ("size", "color", "shape") if keep[k]]
    words = []
    if noun:
        words += (["a"] if keep["shape"] else []) + noun
    if keep["background"]:
        if noun or not bare_background:
            words += ["on", "a"]
        words += [spec.background, "background"]
    return " ".join(words)


def training_caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """10% empty (for classifier-free guidance), 40% full, 50% partial."""
    u = rng.random()
    if u < 0.10:
        return ""
    if u < 0.50:
        return spec.caption()
    keys = ("size", "color", "shape", "background")
    while True:
        keep = {k: bool(rng.random() < 0.5) for k in keys}
        if 0 < sum(keep.values()) < len(keys):
            break
    return partial_caption(spec, keep, bare_background=bool(rng.random() < 0.5))


def render(spec: ShapeSpec, rng: np.random.Generator, resolution: int = 32, supersample: int = 4) -> np.ndarray:
    """One HxWx3 uint8 image: a flat shape at a random position, anti-aliased by supersampling."""
    n = resolution * supersample
    lo, hi = SIZE_RANGE[spec.size]
    side = rng.uniform(lo, hi) * n
    x0 = rng.uniform(0, n - side)
    y0 = rng.uniform(0, n - side)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    if spec.shape == "square":
        inside = (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
    elif spec.shape == "circle":
        r = side / 2
        inside = (xx - x0 - r) ** 2 + (yy - y0 - r) ** 2 <= r * r
    else:  # triangle pointing up, base == height == side
        rel_y = (yy - y0) / side  # 0 at apex, 1 at base
        half_width = rel_y * side / 2
        inside = (rel_y >= 0) & (rel_y <= 1) & (np.abs(xx - (x0 + side / 2)) <= half_width)
    fg = np.array(COLORS[spec.color], np.float32)
    bg = np.array(BACKGROUNDS[spec.background], np.float32)
    big = np.where(inside[..., None], fg, bg)
    img = big.reshape(resolution, supersample, resolution, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def edit_training_caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """The caption mix for SEGA's concepts: 10% empty, 30% full, 30% one attribute, 30% two or three.

    SEGA edits with the difference between a short concept's prediction and the unconditional one, so each
    attribute alone ("blue", "large", "a circle", "black background") needs to be learnt as well as the full
    caption: that difference is what a reverse concept removes. Two and three attributes teach the model that
    the attributes add up, which combinations of concepts (a colour swap plus a background) rely on.
    """
    u = rng.random()
    if u < 0.10:
        return ""
    if u < 0.40:
        return spec.caption()
    keys = ("size", "color", "shape", "background")
    if u < 0.70:
        chosen = {keys[rng.integers(len(keys))]}
    else:
        chosen = set(rng.choice(keys, size=int(rng.integers(2, 4)), replace=False).tolist())
    return partial_caption(spec, {k: k in chosen for k in keys}, bare_background=bool(rng.random() < 0.5))


CAPTION_MIXES = {"partial": training_caption, "edit": edit_training_caption}


def sample_batch(rng: np.random.Generator, batch_size: int, resolution: int = 32, caption_mix: str = "partial"):
    """Images in [-1, 1] as a float32 array (B, 3, H, W) and their training captions (``CAPTION_MIXES``)."""
    caption = CAPTION_MIXES[caption_mix]
    specs = [random_spec(rng) for _ in range(batch_size)]
    images = np.stack([render(s, rng, resolution) for s in specs]).astype(np.float32) / 127.5 - 1.0
    captions = [caption(s, rng) for s in specs]
    return images.transpose(0, 3, 1, 2), captions


# ----------------------------------------------------------------------------------------------
# Attribute reader (pure numpy)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Description:
    background: str
    color: str | None
    shape: str | None
    size: str | None
    mask: np.ndarray  # bool HxW, the foreground

    def attributes(self) -> dict[str, str | None]:
        return {"size": self.size, "color": self.color, "shape": self.shape, "background": self.background}


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = [np.linalg.norm(rgb - np.array(palette[n], np.float32)) for n in names]
    return names[int(np.argmin(d))]


def describe(image) -> Description:
    """Read background, colour, shape and size of a generated image (PIL image or HxWx3 array).

    Background: the palette background nearest to the median border pixel. Colour: the palette colour
    nearest to the median of pixels far (> 80 in RGB distance) from the background. Then a soft
    coverage alpha per pixel (its position between background and colour), so edges count by the share
    of the pixel they cover: width and height are the largest row and column sums of alpha, size is
    large when the larger of them exceeds half the image side, and the shape follows from the area
    over width x height (square 1, circle 0.79, triangle 0.5; cut at 0.9 and 0.7). The mask is alpha > 0.5.
    """
    img = np.asarray(image, dtype=np.float32)[..., :3]
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = _nearest(np.median(border, axis=0), BACKGROUNDS)
    bg = np.array(BACKGROUNDS[background], np.float32)
    far = np.linalg.norm(img - bg, axis=-1) > 80
    if far.sum() < max(4, 0.01 * h * w):
        return Description(background, None, None, None, far)
    color = _nearest(np.median(img[far], axis=0), COLORS)
    direction = np.array(COLORS[color], np.float32) - bg
    alpha = np.clip((img - bg) @ direction / float(direction @ direction), 0.0, 1.0)
    alpha[alpha < 0.15] = 0.0  # ignore faint noise far from the shape
    width, height = alpha.sum(axis=1).max(), alpha.sum(axis=0).max()
    size = "large" if max(width, height) / max(h, w) > 0.5 else "small"
    fill = alpha.sum() / max(width * height, 1e-6)
    shape = "square" if fill > 0.9 else "circle" if fill > 0.7 else "triangle"
    return Description(background, color, shape, size, alpha > 0.5)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def build_tokenizer(max_length: int = 16):
    """A word-level tokenizer over the grammar's words, as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *VOCAB_WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )

