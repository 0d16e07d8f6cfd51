"""Writing results: images with Pillow, videos as MP4 (imageio + its ffmpeg wheel) or WebP/GIF."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webp", ".gif")


def _frames_as_arrays(frames: Sequence[Any]) -> list[np.ndarray]:
    out = []
    for f in frames:
        a = np.asarray(f)
        if a.dtype != np.uint8:
            a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
        out.append(a)
    return out


def save_video(frames: Sequence[Any], path: str | Path, fps: int = 16, quality: int = 8) -> Path:
    """Write frames (PIL images or ``[H, W, 3]`` arrays) to ``path``: ``.mp4`` through imageio's ffmpeg,
    ``.webp``/``.gif`` through Pillow."""
    path = Path(path)
    if not frames:
        raise ConfigError("save_video: no frames to write")
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4":
        try:
            import imageio.v2 as imageio
        except ImportError as exc:  # pragma: no cover - optional dependency
            raise ConfigError("writing MP4 needs imageio and imageio-ffmpeg: pip install 'difforge[video]'") from exc
        with imageio.get_writer(str(path), fps=fps, quality=quality, codec="libx264", macro_block_size=1) as writer:
            for frame in _frames_as_arrays(frames):
                writer.append_data(frame)
        return path
    if suffix in (".webp", ".gif"):
        from PIL import Image

        images = [Image.fromarray(a) for a in _frames_as_arrays(frames)]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
    raise ConfigError(f"save_video: unsupported file type {suffix!r}; use one of {', '.join(VIDEO_SUFFIXES)}")


def save_output(result: Any, path: str | Path, fps: int = 16) -> Path:
    """Save what a pipeline returned (an image, a list of frames, or a batch) to ``path``.

    A batch of images is saved as ``name-0.png``, ``name-1.png``, ...
    """
    from PIL import Image

    path = Path(path)
    if isinstance(result, Image.Image):
        path.parent.mkdir(parents=True, exist_ok=True)
        result.save(path)
        return path
    if isinstance(result, list) and result and isinstance(result[0], Image.Image):
        if path.suffix.lower() in VIDEO_SUFFIXES:
            return save_video(result, path, fps=fps)
        for i, image in enumerate(result):
            image.save(path.with_name(f"{path.stem}-{i}{path.suffix}"))
        return path
    if isinstance(result, list) and result and isinstance(result[0], list):
        for i, clip in enumerate(result):
            save_video(clip, path.with_name(f"{path.stem}-{i}{path.suffix}"), fps=fps)
        return path
    raise ConfigError(f"cannot save a {type(result).__name__} result to {path}; use output_type='pil'")
