"""``load_model``: detect, build on the meta device, assign the weights from the memory map.

No random initialisation and no second copy: the module is constructed on ``torch.device("meta")``
and every parameter is *assigned* a tensor made from the checkpoint, converted on its own to the
requested dtype and device (safetensors on the CPU in the stored dtype: zero-copy views).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Union

from .._names import resolve
from ..errors import LoadError
from .convert import own_state_dict
from .detect import DetectionResult, detect_folder, detect_header, is_weightless_folder
from .state_dict import cast_tensor, open_checkpoint, read_checkpoint_header

log = logging.getLogger(__name__)

__all__ = ["load_model"]

PathArg = Union[str, "PathLike[str]"]


def _few(keys: Sequence[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _source(config_or_path: Any) -> tuple[Any, str | None, str | None]:
    """``(paths, forced model, forced format)`` of a path, a list of paths or a ModelConfig-like
    object (anything with ``paths()``; its optional ``model``/``format`` attributes force those)."""
    paths_fn = getattr(config_or_path, "paths", None)
    if callable(paths_fn):
        model = getattr(config_or_path, "model", None)
        fmt = getattr(config_or_path, "format", None)
        paths = paths_fn()
        return paths, model if isinstance(model, str) else None, fmt if isinstance(fmt, str) else None
    return config_or_path, None, None


def load_model(
    config_or_path: Any,
    torch_dtype: Any = None,
    device: Any = "cpu",
    *,
    detection: DetectionResult | None = None,
    model: str | None = None,
) -> Any:
    """Load the model of a checkpoint: a path, a list of shards, a folder, or a ``ModelConfig``.

    The checkpoint is detected (unless ``detection`` is given; ``model`` forces a ModelSpec name),
    the module built from the detected config on the meta device, and the weights assigned in the
    model's own layout, floating tensors in ``torch_dtype`` (default: as stored), on ``device``.
    Returns the module in eval mode without gradients, with the detection result as
    ``module.difforge_detection``. Raises :class:`LoadError` on missing, unexpected or mis-shaped keys.
    """
    import torch

    from ..plugins import get_registry

    start = time.perf_counter()
    paths, forced_model, forced_format = _source(config_or_path) if config_or_path is not None else (None, None, None)
    model = model or forced_model
    if paths is None and detection is not None:
        paths = list(detection.paths)
    if isinstance(paths, (list, tuple)) and len(paths) == 1:
        paths = paths[0]
    if detection is None and isinstance(paths, (str, PathLike)) and is_weightless_folder(paths):
        detection = detect_folder(Path(os.fspath(paths)))
    if detection is not None and detection.format == "folder":
        spec = get_registry().models.get(detection.model)
        module = resolve(spec.module).from_folder(detection.paths[0], detection.config)
        module.difforge_detection = detection
        return module

    header = read_checkpoint_header(paths)
    if detection is None:
        detection = detect_header(header, model=model, format=forced_format)
    spec = get_registry().models.get(detection.model)
    with torch.device("meta"):
        module = spec.build(detection.config)
    expected = module.state_dict()
    with open_checkpoint(header) as ckpt:
        weights = own_state_dict(ckpt, detection)
        missing = [k for k in expected if k not in weights]
        unexpected = [k for k in weights if k not in expected]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing key(s): {_few(missing)}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
            raise LoadError(
                f"{', '.join(detection.paths)} does not fit {detection.model} (format {detection.format}, "
                f"config {detection.config}): {'; '.join(parts)}. Is the file incomplete, or a different model?"
            )
        wrong = [f"{k} {list(weights.shapes[k])} (model wants {list(v.shape)})"
                 for k, v in expected.items() if tuple(v.shape) != tuple(weights.shapes[k])]  # fmt: skip
        if wrong:
            raise LoadError(
                f"{', '.join(detection.paths)}: tensor shapes do not fit {detection.model} with config "
                f"{detection.config}: {_few(wrong, 5)}."
            )
        state = {k: cast_tensor(weights[k], device, torch_dtype) for k in expected}
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise LoadError(f"{', '.join(detection.paths)}: cannot load into {detection.model}: {exc}") from None
    del state
    on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if on_meta:
        raise LoadError(
            f"{detection.model}: {_few(on_meta)} stayed on the meta device after loading; a model must not "
            "create non-persistent buffers in __init__ (compute them in forward or lazily per device)."
        )
    module.eval()
    module.requires_grad_(False)
    module.difforge_detection = detection
    log.info(
        "loaded %s (%s%s, format %s) from %s in %.2fs",
        detection.model,
        detection.family,
        f", {detection.variant}" if detection.variant else "",
        detection.format,
        ", ".join(detection.paths),
        time.perf_counter() - start,
    )
    return module
