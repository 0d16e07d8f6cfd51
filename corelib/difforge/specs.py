"""The frozen spec objects that plugins yield from the registration hooks.

Every callable field may be given as a lazy ``"package.module:attribute"`` string, resolved on
first use (:func:`difforge._names.resolve`), so that a plugin's entry module stays light.
Specs are plain frozen dataclasses: they hold data and references, never state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Union

from ._names import normalize_name, resolve

__all__ = [
    "BlockGroup",
    "BlockLayout",
    "ModelSpec",
    "SlotSpec",
    "SourceSpec",
    "PipelineSpec",
    "ConverterSpec",
    "SchedulerSpec",
    "CacheSpec",
    "OffloadSpec",
    "AttentionQuery",
    "AttentionSpec",
    "Handle",
    "SPEC_KINDS",
]

Ref = Union[str, Callable[..., Any], type]
"""A callable or class, or a lazy ``"module:attr"`` string naming one."""

Shapes = Mapping[str, tuple[int, ...]]
"""Tensor names to shapes, as read from a checkpoint header (never the data)."""


class Handle(Protocol):
    """What ``apply`` of a cache, offload or other wrapper returns: a way to undo it."""

    def remove(self) -> None: ...


def _check_name(obj: Any) -> None:
    normalize_name(obj.name)  # raises TypeError on empty names


@dataclass(frozen=True)
class BlockGroup:
    """One ``nn.ModuleList`` of transformer blocks inside a model.

    ``path`` is the dotted attribute path of the list (``"double_blocks"``). ``streams`` names the
    block arguments that carry the hidden states through the list, in order: each block is called
    with them as its first positional (or keyword) arguments and returns them in the same order
    (a single tensor when there is one stream). Other arguments (timestep embedding, RoPE, masks)
    are passed through unchanged. Cache and offload plugins rely on exactly this contract.
    """

    path: str
    streams: tuple[str, ...] = ("hidden_states",)


@dataclass(frozen=True)
class BlockLayout:
    """The transformer blocks of a model, in the order its ``forward`` runs them.

    ``skip_connections``: True for a U-Net, whose blocks change resolution and width and whose
    shallow features reach the output through skip connections (down blocks push them, up blocks
    pop them, through an argument other than the streams; the blocks are symmetric: block ``k`` of
    ``n`` pushes what block ``n-1-k`` pops). A cache then reuses the skipped middle's
    stored *output* as is (DeepCache's original form) instead of adding its residual to fresh
    inputs, and threshold strategies compare the front blocks' outputs across steps, not residuals.
    """

    groups: tuple[BlockGroup, ...]
    skip_connections: bool = False

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("a BlockLayout needs at least one BlockGroup")


@dataclass(frozen=True)
class ModelSpec:
    """A model a family plugin can build, detect and load.

    - ``module``: the ``nn.Module`` class (lazy); it is constructed as ``module(config)``.
    - ``config_from_shapes(shapes) -> config | None``: infer the architecture config from the key
      names and shapes of a state dict in this model's own layout (``format``); None when the keys
      are not this model's.
    - ``config_from_json(config_dict, shapes) -> config | None``: optional; turns the
      ``config.json`` found beside the weights (diffusers/transformers folders) into the config.
    - ``detect_folder(path) -> config | None``: optional, for components that are folders without
      weights (tokenizers); the ``module`` then has a ``from_folder(path, config)`` classmethod.
    - ``identifying_keys``: keys (own layout; ``*`` matches one or more name parts) whose presence
      marks a state dict as this model's, used for structural detection.
    - ``fingerprints``: ``{fingerprint: variant}`` of released checkpoints, variant spelt as its
      publisher does (``"FLUX.1-dev"``). Several fingerprints (formats) may name one variant.
    - ``layout``: the transformer blocks, for cache and offload plugins (None for VAEs, encoders
      without one).
    - ``keep_high_precision``: glob patterns of parameter names (norms, embeddings, first and last
      projections) that dtype backends such as fp8 never cast.
    - ``format``: the name of this model's own checkpoint layout (``"bfl"``, ``"wan"``, ...).
    - ``released_configs``: ``{variant: config}`` of released checkpoints, for header-level tests and
      for naming the nearest known model in detection errors.
    """

    name: str
    family: str
    role: str
    module: Ref
    config_from_shapes: Ref | None
    format: str
    identifying_keys: tuple[str, ...] = ()
    config_from_json: Ref | None = None
    detect_folder: Ref | None = None
    fingerprints: Mapping[str, str] = field(default_factory=dict)
    layout: BlockLayout | None = None
    keep_high_precision: tuple[str, ...] = ()
    released_configs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        _check_name(self)

    def build(self, config: Any) -> Any:
        """Construct the module for ``config`` (on whatever device is current)."""
        return resolve(self.module)(config)

    def infer_config(self, shapes: Shapes) -> Any:
        if self.config_from_shapes is None:
            return None
        return resolve(self.config_from_shapes)(shapes)


@dataclass(frozen=True)
class SlotSpec:
    """One component slot of a pipeline (``dit``, ``vae``, ``text_encoder_2``, ``tokenizer``)."""

    name: str
    models: tuple[str, ...]
    """ModelSpec names (or, for ``kind="tokenizer"``, tokenizer kinds) that can fill this slot."""
    required: bool = True
    kind: Literal["model", "tokenizer"] = "model"
    diffusers_subfolder: str | None = None
    """The subfolder of a diffusers-layout folder that holds this component."""


@dataclass(frozen=True)
class SourceSpec:
    """A default download source of one pipeline component."""

    slot: str
    model_id: str
    origin_file_pattern: str
    download_source: Literal["modelscope", "huggingface"] | None = None
    """None: available from both under the same id."""


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline a family plugin provides.

    - ``slots``: the components and which models fill them.
    - ``pipeline``: the pipeline class (lazy), a subclass of :class:`difforge.Pipeline`.
    - ``default_scheduler``: a scheduler name or ``{"name": ..., **options}`` used when the user
      gives none and no released variant (``variant_schedulers``) was detected.
    - ``variant_schedulers``: ``{variant: scheduler}``, the scheduler each released model ships with.
    - ``sources``: default download sources per slot, per released variant
      (``{"FLUX.1-dev": (SourceSpec, ...)}``); the first entry is the default variant.
    - ``component_order``: the order in which components run (for model-level offload).
    """

    name: str
    family: str
    slots: tuple[SlotSpec, ...]
    pipeline: Ref
    default_scheduler: str | Mapping[str, Any] = "flow-euler"
    variant_schedulers: Mapping[str, str | Mapping[str, Any]] = field(default_factory=dict)
    sources: Mapping[str, tuple[SourceSpec, ...]] = field(default_factory=dict)
    component_order: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        _check_name(self)

    def slot(self, name: str) -> SlotSpec:
        for slot in self.slots:
            if slot.name == name:
                return slot
        raise KeyError(name)


@dataclass(frozen=True)
class ConverterSpec:
    """Turns a foreign checkpoint or LoRA layout into a model's own.

    - ``detect(keys, metadata) -> bool``: whether a state dict (keys after the generic prefix
      stripping of ``model.diffusion_model.`` / ``diffusion_model.`` / ``model.``) is in this
      converter's source format for this target. Must read keys only.
    - ``rename(key) -> str | None``: a pure function from a source key to the target key; None drops
      the key. Being pure is what lets weights stay memory-mapped.
    - ``transform(state_dict) -> state_dict``: optional, for the few real tensor edits (fuse or split
      qkv, swap shift/scale halves). It receives the renamed mapping and must work on meta tensors
      too (detection runs it on meta tensors to learn the resulting shapes).
    - ``inverse``: optional ``(rename, transform)`` pair going back from the model's own layout to this
      format, used by ``difforge convert`` and by tests that write original-format files.
    """

    name: str
    source_format: str
    target_model: str
    detect: Ref
    rename: Ref
    transform: Ref | None = None
    inverse_rename: Ref | None = None
    inverse_transform: Ref | None = None
    kind: Literal["checkpoint", "lora"] = "checkpoint"
    description: str = ""

    def __post_init__(self) -> None:
        _check_name(self)


@dataclass(frozen=True)
class SchedulerSpec:
    """A sampler a pipeline can run.

    ``factory(**options)`` returns an object following :class:`difforge.schedulers.Scheduler`.
    ``families``: the model families it fits (``("*",)`` for all); ``options``: documented options
    with their defaults.
    """

    name: str
    factory: Ref
    families: tuple[str, ...] = ("*",)
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        _check_name(self)

    def fits(self, family: str) -> bool:
        return "*" in self.families or normalize_name(family) in {normalize_name(f) for f in self.families}


@dataclass(frozen=True)
class CacheSpec:
    """A step/block cache strategy.

    ``apply(model, layout, options) -> handle`` wraps the blocks named by ``layout`` (a
    :class:`BlockLayout`) and returns a handle with ``remove()``, ``reset()`` and ``stats()``. The core
    calls ``reset()`` at the start of every pipeline call and selects the CFG branch through
    :func:`difforge.runtime.cache_branch`; plugins never patch ``__call__``.
    """

    name: str
    apply: Ref
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        _check_name(self)


@dataclass(frozen=True)
class OffloadSpec:
    """Where and in which dtype weights live.

    ``kind="dtype"`` backends (fp8) change storage dtype; ``kind="location"`` backends (cpu,
    sequential, disk) move weights. ``apply(pipeline, options) -> handle`` with ``remove()``.
    The core applies dtype backends before location backends, then caches, then attention.
    """

    name: str
    kind: Literal["dtype", "location"]
    apply: Ref
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        _check_name(self)
        if self.kind not in ("dtype", "location"):
            raise ValueError(f"OffloadSpec {self.name!r}: kind must be 'dtype' or 'location', not {self.kind!r}")


@dataclass(frozen=True)
class AttentionQuery:
    """What an attention call looks like, for ``AttentionSpec.supports``."""

    device_type: str
    dtype: Any
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    has_mask: bool
    mask_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class AttentionSpec:
    """An attention kernel serving :func:`difforge.ops.attention`.

    ``fn(q, k, v, *, mask=None, scale=None)`` takes and returns ``[B, H, N, D]`` tensors (k and v
    may have fewer heads, a divisor of q's); ``mask`` is boolean, broadcastable to
    ``[B, H, Nq, Nk]``, True where a query may attend. ``supports(query)`` returns True, or a string
    saying why not. ``auto`` picks the highest ``priority`` backend that supports a call.
    """

    name: str
    fn: Ref
    supports: Ref
    priority: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        _check_name(self)


SPEC_KINDS: dict[str, type] = {
    "models": ModelSpec,
    "pipelines": PipelineSpec,
    "converters": ConverterSpec,
    "schedulers": SchedulerSpec,
    "caches": CacheSpec,
    "offload": OffloadSpec,
    "attention": AttentionSpec,
}
"""Registry table name -> the spec type stored in it."""
