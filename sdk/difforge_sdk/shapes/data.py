"""The procedural "shapes" data set: one coloured shape on a coloured background, with its caption.

Every image is a circle, square or triangle in one of :data:`PALETTE`'s colours on a background of a
different palette colour, at a random size and position (wholly inside the image), captioned
``"a red circle on a blue background"``. :func:`write_dataset` writes a folder in the layout
``difforge train`` reads (``metadata.csv`` with columns ``image,prompt`` and the PNG files).
:func:`classify` reads the colours back from pixels (background from the border, shape from the pixels
that differ from it, each the nearest palette colour); the demo test and ``benchmarks/demo_quality.py``
score generated images with it.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["PALETTE", "SHAPES", "Sample", "caption", "draw", "sample", "samples", "write_dataset", "classify", "all_prompts"]

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 135, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
"""Eight clearly distinct colours (the shape's colour is never the background's)."""

SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Sample:
    shape: str
    color: str
    background: str
    center: tuple[float, float]
    radius: float

    @property
    def prompt(self) -> str:
        return caption(self.shape, self.color, self.background)


def caption(shape: str, color: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def all_prompts() -> list[str]:
    """Every caption the data set can have (8 x 7 x 3 = 168)."""
    return [caption(s, c, b) for s in SHAPES for c in PALETTE for b in PALETTE if c != b]


def sample(rng: random.Random, size: int = 64) -> Sample:
    """A random shape: radius 22-40% of the image side, wholly inside the image."""
    colors = list(PALETTE)
    color = rng.choice(colors)
    background = rng.choice([c for c in colors if c != color])
    radius = rng.uniform(0.22, 0.40) * size
    margin = radius + 1
    center = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
    return Sample(rng.choice(SHAPES), color, background, center, radius)


def samples(n: int, seed: int = 0, size: int = 64) -> Iterator[Sample]:
    rng = random.Random(seed)
    for _ in range(n):
        yield sample(rng, size)


def draw(s: Sample, size: int = 64) -> Image.Image:
    """The RGB image of sample ``s``."""
    image = Image.new("RGB", (size, size), PALETTE[s.background])
    pen = ImageDraw.Draw(image)
    (x, y), r, fill = s.center, s.radius, PALETTE[s.color]
    if s.shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif s.shape == "square":
        h = r * 0.85  # a square of about the circle's area
        pen.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    else:  # an upward equilateral triangle inscribed in the circle of radius r
        pen.polygon([(x, y - r), (x - 0.866 * r, y + 0.5 * r), (x + 0.866 * r, y + 0.5 * r)], fill=fill)
    return image


def write_dataset(folder: str | Path, n: int, seed: int = 0, size: int = 64) -> Path:
    """Write ``n`` images and ``metadata.csv`` (``image,prompt``) into ``folder``; returns the csv path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(samples(n, seed, size)):
        name = f"images/{i:05d}.png"
        draw(s, size).save(folder / name)
        rows.append((name, s.prompt))
    path = folder / "metadata.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prompt"])
        writer.writerows(rows)
    return path


def _nearest(rgb: np.ndarray) -> str:
    names = list(PALETTE)
    table = np.array([PALETTE[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((table - rgb[None].astype(np.float32)) ** 2).sum(-1)))]


def classify(image: Image.Image | np.ndarray, border: int = 3, threshold: float = 60.0) -> tuple[str | None, str]:
    """``(shape colour, background colour)`` read from pixels, each the nearest palette colour.

    The background is the median of a ``border``-pixel frame; the shape is the median of the pixels
    farther than ``threshold`` (RGB distance) from it (None when fewer than 2% of the pixels are).
    """
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if a.max() <= 1.0:
        a = a * 255.0
    frame = np.concatenate([a[:border].reshape(-1, 3), a[-border:].reshape(-1, 3), a[:, :border].reshape(-1, 3),
                            a[:, -border:].reshape(-1, 3)])
    bg = np.median(frame, axis=0)
    far = np.sqrt(((a - bg) ** 2).sum(-1)) > threshold
    background = _nearest(bg)
    if far.mean() < 0.02:
        return None, background
    return _nearest(np.median(a[far], axis=0)), background


def prompt_colors(prompt: str) -> tuple[str, str]:
    """``(shape colour, background colour)`` named by a caption of the data set's form."""
    words = prompt.lower().replace(",", " ").split()
    named = [w for w in words if w in PALETTE]
    if len(named) != 2:
        raise ValueError(f"prompt {prompt!r} does not name a shape colour and a background colour from {list(PALETTE)}")
    return named[0], named[1]


def matches(image: Image.Image | np.ndarray, prompt: str) -> bool:
    shape, background = classify(image)
    return (shape, background) == prompt_colors(prompt)


def fixed_prompts(n: int = 24, seed: int = 1234) -> list[str]:
    """``n`` fixed captions (every shape equally often), for tests and benchmarks."""
    rng = random.Random(seed)
    out: list[str] = []
    names = list(PALETTE)
    for i in range(n):
        c = rng.choice(names)
        b = rng.choice([x for x in names if x != c])
        out.append(caption(SHAPES[i % len(SHAPES)], c, b))
    return out


