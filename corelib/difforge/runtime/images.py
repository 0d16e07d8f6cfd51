"""Image conversion between users (PIL, numpy, paths) and models (tensors in [-1, 1])."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError


def preprocess_image(image: Any, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """A PIL image, path, ``[H, W, 3]`` array in [0, 1] or ``[B, 3, H, W]`` tensor in [-1, 1] ->
    a float32 ``[B, 3, H, W]`` tensor in [-1, 1], resized (bicubic) to ``height`` x ``width``."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        try:
            image = Image.open(image)
        except OSError as exc:
            raise ConfigError(f"input_image: cannot open {image}: {exc}") from exc
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if height and width and image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0
    if isinstance(image, np.ndarray):
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32))
        tensor = tensor[None] if tensor.dim() == 3 else tensor
        return preprocess_image(tensor.permute(0, 3, 1, 2) * 2.0 - 1.0, height, width)
    if isinstance(image, torch.Tensor):
        tensor = image.float()
        tensor = tensor[None] if tensor.dim() == 3 else tensor
        if tensor.dim() != 4 or tensor.shape[1] != 3:
            raise ConfigError(f"input_image tensor must be [B, 3, H, W] in [-1, 1], got {tuple(image.shape)}")
        if height and width and tuple(tensor.shape[-2:]) != (height, width):
            tensor = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bicubic", align_corners=False)
        return tensor
    raise ConfigError(f"input_image must be a PIL image, a path, a numpy array or a tensor, got {type(image).__name__}")


def postprocess(images: torch.Tensor, output_type: str) -> Any:
    """Decoded ``[B, 3, H, W]`` (or video ``[B, 3, F, H, W]``) in [-1, 1] -> the requested output type.

    ``pt``: float in [0, 1] in the same layout; ``np``: float in [0, 1], ``[B, H, W, 3]`` or
    ``[B, F, H, W, 3]``; ``pil``: one image, a list for a batch; video: a list of frames (a list of
    such lists for a batch).
    """
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    video = images.dim() == 5
    array = (images.permute(0, 2, 3, 4, 1) if video else images.permute(0, 2, 3, 1)).cpu().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    def to_pil(a: np.ndarray) -> Any:
        return Image.fromarray((a * 255).round().astype(np.uint8))

    if video:
        out = [[to_pil(frame) for frame in clip] for clip in array]
    else:
        out = [to_pil(a) for a in array]
    return out[0] if len(out) == 1 else out
