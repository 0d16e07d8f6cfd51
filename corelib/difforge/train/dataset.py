"""The training data: a folder of images with ``metadata.csv`` (columns ``image,prompt``).

Fixed resolution (``height``/``width``): each image is scaled to cover the size and centre-cropped.
Dynamic resolution (``max_pixels``): an image larger than ``max_pixels`` is scaled down to fit, then
centre-cropped to multiples of the pipeline's ``spatial_multiple``; batches only ever hold images of one
size (:class:`SizeBuckets`).
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError

__all__ = ["ImageTextDataset", "SizeBuckets", "read_metadata", "target_size"]


def read_metadata(path: Path, base: Path) -> list[tuple[Path, str]]:
    """``[(image path, prompt)]`` from a ``metadata.csv``; every image must exist."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "image" not in columns or "prompt" not in columns:
            raise ConfigError(
                f"train: {path} has columns {columns}; it needs the columns image,prompt "
                "(the image path relative to --dataset_base_path, and its caption)"
            )
        rows = [(base / row["image"], row["prompt"] or "") for row in reader]
    if not rows:
        raise ConfigError(f"train: {path} lists no images")
    missing = [str(p) for p, _ in rows if not p.is_file()]
    if missing:
        raise ConfigError(
            f"train: {len(missing)} image(s) listed in {path} do not exist, e.g. {missing[0]}; "
            "image paths are relative to --dataset_base_path"
        )
    return rows


def target_size(width: int, height: int, *, fixed: tuple[int, int] | None, max_pixels: int | None, multiple: int) -> tuple[int, int]:
    """``(height, width)`` an image of ``width`` x ``height`` is trained at."""
    if fixed is not None:
        return fixed
    scale = 1.0
    if max_pixels is not None and width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
    h = int(height * scale) // multiple * multiple
    w = int(width * scale) // multiple * multiple
    if h < multiple or w < multiple:
        raise ConfigError(
            f"train: an image of {width}x{height} is smaller than {multiple} pixels after scaling; "
            "raise --max_pixels or drop the image"
        )
    return h, w


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """``[3, H, W]`` in [-1, 1]: scaled to cover ``size`` (bicubic), centre-cropped."""
    h, w = size
    try:
        image = Image.open(path).convert("RGB")
    except OSError as exc:
        raise ConfigError(f"train: cannot read image {path}: {exc}") from exc
    scale = max(h / image.height, w / image.width)
    if scale != 1.0 or image.size != (w, h):
        nw, nh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
        if (nw, nh) != image.size:
            image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (image.width - w) // 2, (image.height - h) // 2
        image = image.crop((left, top, left + w, top + h))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageTextDataset(torch.utils.data.Dataset):
    """Items ``{"index", "image" [3, H, W] in [-1, 1], "prompt"}``; ``repeat`` passes over the rows."""

    def __init__(
        self,
        rows: Sequence[tuple[Path, str]],
        *,
        fixed: tuple[int, int] | None,
        max_pixels: int | None,
        multiple: int,
        repeat: int = 1,
    ) -> None:
        self.rows = list(rows)
        self.repeat = repeat
        self.load_images = True  # False: items without the image (its latents are cached)
        self.sizes: list[tuple[int, int]] = []
        for path, _ in self.rows:
            if fixed is not None:
                self.sizes.append(fixed)
                continue
            try:
                with Image.open(path) as im:
                    w, h = im.size
            except OSError as exc:
                raise ConfigError(f"train: cannot read image {path}: {exc}") from exc
            self.sizes.append(target_size(w, h, fixed=None, max_pixels=max_pixels, multiple=multiple))

    def __len__(self) -> int:
        return len(self.rows) * self.repeat

    def row(self, index: int) -> int:
        return index % len(self.rows)

    def size(self, index: int) -> tuple[int, int]:
        return self.sizes[self.row(index)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, prompt = self.rows[self.row(index)]
        if not self.load_images:
            return {"index": index, "prompt": prompt}
        return {"index": index, "image": load_image(path, self.sizes[self.row(index)]), "prompt": prompt}


class SizeBuckets(torch.utils.data.Sampler):
    """Batches of indices whose images have one size, shuffled per epoch from ``seed``.

    ``drop_last``: drop each size's last incomplete batch (so every batch has ``batch_size`` items).
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        self.sizes, self.batch_size, self.seed, self.shuffle, self.drop_last = list(sizes), batch_size, seed, shuffle, drop_last
        self.epoch = 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        """This epoch's batches (computed once per epoch: ``len()`` is asked often)."""
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self._make_batches())
        return self._cached[1]

    def _make_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(self.sizes):
            groups.setdefault(size, []).append(i)
        batches = []
        for size in sorted(groups):
            idx = groups[size]
            if self.shuffle:
                rng.shuffle(idx)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())
