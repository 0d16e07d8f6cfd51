"""Tiny configs and seeded random checkpoints of any registered model, in any registered format.

No weights can be downloaded where difforge is built and tested, so every test and ``make demo``
writes its own: a model built at a tiny config, its weights drawn from a seeded generator, saved in
the model's own layout or in the layout of any checkpoint converter that has an inverse::

    from difforge_sdk import tiny

    tiny.register_tiny("my-dit", MyDiTConfig(hidden_size=32, depth=2))  # a ModelConformance class does this
    path = tiny.write_checkpoint("my-dit", tmp_path, format="diffusers", seed=0)
    difforge.detect(path).format  # "diffusers"

The first-party models (toy, FLUX.1, the text encoders) come with tiny configs; any other model gets
one from :func:`register_tiny` or from the ``tiny_config`` of a
:class:`~difforge_sdk.testing.ModelConformance` subclass. Tiny tokenizers (trained locally, written
in the files real repositories ship) come from :func:`write_tokenizer`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difforge import ConfigError, ConverterSpec, ModelSpec
from difforge._names import normalize_name, resolve

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "register_tiny",
    "tiny_config",
    "tiny_models",
    "model_spec",
    "formats",
    "randomize",
    "random_model",
    "to_format",
    "write_checkpoint",
    "write_tokenizer",
]

_TINY: dict[str, Any] = {}

#: tiny configs of the first-party models, resolved lazily (the plugin need not be installed to import this)
FIRST_PARTY: dict[str, tuple[str, dict[str, Any]]] = {
    "toy-dit": ("difforge_sdk.toy.models:ToyDiTConfig", {"depth": 2}),
    "toy-vae": ("difforge_sdk.toy.models:ToyVAEConfig", {}),
    "toy-text-encoder": ("difforge_sdk.toy.models:ToyTextConfig", {}),
    "flux-dit": (
        "difforge_flux.dit:FluxDiTConfig",
        dict(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=4,
             depth=1, depth_single_blocks=2, axes_dim=(4, 6, 6)),
    ),
    "flux-ae": ("difforge_flux.ae:FluxAEConfig", dict(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)),
    # CLIP's head count is not in the shapes: inference assumes 64-wide heads, so hidden 64 has one head
    "clip-text": (
        "difforge_text_encoders.clip:CLIPTextConfig",
        dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
             max_position_embeddings=16, hidden_act="gelu"),
    ),
    "t5-encoder": (
        "difforge_text_encoders.t5:T5EncoderConfig",
        dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
    ),
    "umt5-encoder": (
        "difforge_text_encoders.t5:T5EncoderConfig",
        dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
             position_bias_per_layer=True),
    ),
    # Qwen2.5-VL's head dim (128) is not in the shapes either: 2 query heads, 1 key/value head
    "qwen2.5-vl-text": (
        "difforge_text_encoders.qwen2_5_vl:Qwen25VLTextConfig",
        dict(vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1),
    ),
    # the MSRoPE split (2:7:7 of the head dim) is not in the shapes: head dim 16 gives (4, 6, 6)
    "qwen-image-dit": (
        "difforge_qwen_image.dit:QwenImageDiTConfig",
        dict(in_channels=16, out_channels=4, num_layers=2, num_heads=2, head_dim=16, text_dim=32, axes_dim=(4, 6, 6)),
    ),
}

#: tokenizer model name -> writer ``(folder) -> folder``
TOKENIZERS: dict[str, str] = {
    "clip-tokenizer": "difforge_sdk.tiny_tokenizers:write_clip_tokenizer",
    "t5-tokenizer": "difforge_sdk.tiny_tokenizers:write_t5_tokenizer",
    "qwen2-tokenizer": "difforge_sdk.tiny_tokenizers:write_qwen2_tokenizer",
}


# ---------------------------------------------------------------- the tiny config registry


def register_tiny(model: str, config: Any) -> None:
    """Make ``config`` the tiny config of ModelSpec ``model`` (a later registration replaces it)."""
    _TINY[normalize_name(model)] = config


def tiny_config(model: str) -> Any:
    """The tiny config of ``model``: registered by :func:`register_tiny` (or a conformance class), or a
    first-party default. Raises :class:`~difforge.ConfigError` naming the ways to provide one."""
    key = normalize_name(model)
    if key in _TINY:
        return _TINY[key]
    first = {normalize_name(k): v for k, v in FIRST_PARTY.items()}.get(key)
    if first is not None:
        cls, kwargs = first
        return resolve(cls)(**kwargs)
    raise ConfigError(
        f"no tiny config for model {model!r}: call difforge_sdk.tiny.register_tiny({model!r}, YourConfig(...)) "
        "or define a ModelConformance test class with model = ... and tiny_config = ... before asking for one"
    )


def tiny_models() -> list[str]:
    """The names of every model with a tiny config (registered or first-party)."""
    return sorted({*_TINY, *(normalize_name(k) for k in FIRST_PARTY)})


# ---------------------------------------------------------------- formats


def model_spec(model: str | ModelSpec, registry: Any = None) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if registry is None:
        import difforge

        registry = difforge.get_registry()
    return registry.models.get(model)


def formats(model: str | ModelSpec, registry: Any = None, *, writable_only: bool = True) -> dict[str, ConverterSpec | None]:
    """``{format: converter}`` of every checkpoint format of ``model``: its own (converter None) and the
    ``source_format`` of every checkpoint converter targeting it (with an inverse, unless
    ``writable_only=False``)."""
    import difforge

    registry = registry if registry is not None else difforge.get_registry()
    spec = model_spec(model, registry)
    out: dict[str, ConverterSpec | None] = {spec.format: None}
    for conv in registry.converters:
        if conv.kind != "checkpoint" or normalize_name(conv.target_model) != normalize_name(spec.name):
            continue
        if writable_only and conv.inverse_rename is None:
            continue
        out.setdefault(conv.source_format, conv)
    return out


def to_format(state_dict: Mapping[str, Any], converter: ConverterSpec | None) -> dict[str, Any]:
    """An own-layout state dict in a converter's source layout (inverse transform, then inverse rename)."""
    tensors = dict(state_dict)
    if converter is None:
        return tensors
    if converter.inverse_rename is None:
        raise ConfigError(
            f"converter {converter.name!r} has no inverse_rename, so format {converter.source_format!r} cannot be "
            "written; give the ConverterSpec inverse_rename (and inverse_transform if it has a transform)"
        )
    if converter.inverse_transform is not None:
        tensors = resolve(converter.inverse_transform)(tensors)
    inverse: Callable[[str], str | None] = resolve(converter.inverse_rename)
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        new = inverse(key)
        if new is None:
            continue
        if new in out:
            raise ConfigError(f"converter {converter.name!r}: inverse_rename maps two keys to {new!r} (the second is {key!r})")
        out[new] = value
    return out


# ---------------------------------------------------------------- random weights


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Draw every floating parameter of ``module`` from a generator seeded with ``seed``, in place.

    Matrices and kernels get ``N(0, scale^2 / fan_in)`` (activations keep their size through the
    layers); vectors that are all ones (norm scales) get ``1 + N(0, 0.2^2)``, other vectors (biases)
    ``N(0, 0.2^2)``. Nothing is left zero-initialised, so every path of the model is exercised.
    Tied parameters stay tied; buffers are left alone.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            if not p.is_floating_point() or p.is_meta:
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() >= 2:
                value = noise * (scale / max(1, p[0].numel()) ** 0.5)
            elif p.numel() and bool((p == 1).all()):
                value = 1 + 0.2 * noise
            else:
                value = 0.2 * noise
            p.copy_(value.to(p.dtype))
    return module


def random_model(
    model: str | ModelSpec,
    config: Any = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    registry: Any = None,
) -> torch.nn.Module:
    """``model`` built at ``config`` (default: its tiny config) on ``device``, weights from :func:`randomize`,
    in eval mode without gradients."""
    import torch

    spec = model_spec(model, registry)
    config = tiny_config(spec.name) if config is None else config
    torch.manual_seed(seed)  # whatever the constructor draws is seeded too
    with torch.device(device):
        module = spec.build(config)
    randomize(module, seed)
    if dtype is not None:
        module.to(dtype)
    return module.eval().requires_grad_(False)


def write_checkpoint(
    model: str | ModelSpec,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    config: Any = None,
    seed: int = 0,
    module: torch.nn.Module | None = None,
    prefix: str = "",
    registry: Any = None,
) -> Path:
    """Write a tiny random checkpoint of ``model`` in ``format`` (default: its own) as safetensors.

    ``module``: write this module's weights instead of a :func:`random_model`. ``prefix`` is put before
    every key (``"model.diffusion_model."``, as ComfyUI does). A folder ``path`` gets
    ``<model>.<format>.safetensors`` inside. Returns the file written.
    """
    from difforge.loading.state_dict import save_safetensors

    spec = model_spec(model, registry)
    fmt = spec.format if format is None else format
    available = formats(spec, registry, writable_only=False)
    match = {normalize_name(k): (k, v) for k, v in available.items()}.get(normalize_name(fmt))
    if match is None:
        raise ConfigError(f"{spec.name} has no format {fmt!r}; its formats: {', '.join(available)}")
    fmt, converter = match
    if module is None:
        module = random_model(spec, config, seed=seed, registry=registry)
    tensors = to_format(module.state_dict(), converter)
    out = Path(os.fspath(path))
    if out.is_dir() or not out.suffix:
        out = out / f"{spec.name}.{normalize_name(fmt)}.safetensors"
    save_safetensors({prefix + k: v for k, v in tensors.items()}, out, {"format": "pt"})
    log.debug("wrote tiny %s (format %s) to %s", spec.name, fmt, out)
    return out


def write_tokenizer(model: str, folder: str | os.PathLike[str]) -> Path:
    """A tiny tokenizer folder recognised as tokenizer model ``model`` (``clip-tokenizer``, ``t5-tokenizer``,
    ``qwen2-tokenizer``)."""
    writer = {normalize_name(k): v for k, v in TOKENIZERS.items()}.get(normalize_name(model))
    if writer is None:
        raise ConfigError(f"no tiny tokenizer writer for {model!r}; known: {', '.join(TOKENIZERS)}")
    return resolve(writer)(Path(os.fspath(folder)))
