"""Converters applied as DESIGN.md says: a pure key rename, then the rare tensor transform.

- :func:`convert_shapes` runs a converter on meta tensors (detection learns the own-layout shapes).
- :func:`own_state_dict` gives a checkpoint's tensors in its model's own layout, lazily: renamed keys
  stay memory-mapped views, and the transform is traced once on meta tensors to learn which source
  tensors each transformed output needs, so it later runs on those few tensors only, one group at a
  time (a fused qkv is built when its block is loaded, not the whole model at once).
- :func:`convert_checkpoint` writes a checkpoint in another registered format (safetensors only).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .._names import normalize_name, resolve
from ..errors import ConversionError
from ..specs import ConverterSpec

if TYPE_CHECKING:  # pragma: no cover
    from ..registry import Registry
    from .detect import DetectionResult
    from .state_dict import Checkpoint

log = logging.getLogger(__name__)

__all__ = ["LazyStateDict", "checkpoint_converters", "convert_shapes", "own_state_dict", "convert_checkpoint"]

PathArg = Union[str, "PathLike[str]"]


def checkpoint_converters(registry: Registry | None = None) -> list[ConverterSpec]:
    """Every registered converter of ``kind="checkpoint"``."""
    if registry is None:
        from ..plugins import get_registry

        registry = get_registry()
    return [c for c in registry.converters if c.kind == "checkpoint"]


def rename_keys(keys: Sequence[str], converter: ConverterSpec) -> dict[str, str]:
    """``{target key: source key}`` under ``converter.rename`` (keys renamed to None are dropped).

    Two source keys renamed to one target key is a :class:`ConversionError`.
    """
    rename = resolve(converter.rename)
    out: dict[str, str] = {}
    for key in keys:
        new = rename(key)
        if new is None:
            continue
        if new in out:
            raise ConversionError(
                f"converter {converter.name!r} renames both {out[new]!r} and {key!r} to {new!r}; "
                "the converter's rename is not one-to-one for this file."
            )
        out[new] = key
    return out


def _meta(shape: Sequence[int], dtype: str) -> Any:
    import torch

    from .safetensors_header import torch_dtype

    return torch.empty(tuple(shape), dtype=torch_dtype(dtype), device="meta")


def _meta_ops_mode() -> Any:
    """A torch-function mode answering ``cat``/``stack`` of meta tensors from shapes alone.

    torch's own meta kernels for these go through ``torch._refs``, whose first use imports
    ``torch._dynamo`` (seconds, and ~75 MiB); converter transforms only need the shapes.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    joins = {torch.cat, torch.concat, torch.concatenate, torch.stack}

    class MetaJoins(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if func in joins and args and not kwargs.get("out"):
                tensors = list(args[0])
                dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
                if tensors and all(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
                    return _join_shapes(func is torch.stack, tensors, dim)
            return func(*args, **kwargs)

    return MetaJoins()


def _join_shapes(stack: bool, tensors: list[Any], dim: int) -> Any:
    import torch

    first = list(tensors[0].shape)
    if stack:
        dim = dim % (len(first) + 1)
        shape = first[:dim] + [len(tensors)] + first[dim:]
    else:
        dim = dim % len(first)
        shape = first[:]
        shape[dim] = sum(int(t.shape[dim]) for t in tensors)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    out = torch.empty(shape, dtype=dtype, device="meta")
    cls = type(tensors[0])
    if cls is not torch.Tensor:  # keep a tracing subclass and what it traced
        out = out.as_subclass(cls)
        out.sources = frozenset().union(*(getattr(t, "sources", frozenset()) for t in tensors))
    return out


def convert_shapes(
    converter: ConverterSpec, shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, str] | None = None
) -> dict[str, tuple[int, ...]]:
    """The own-layout ``{key: shape}`` a converter makes of ``shapes`` (rename, then the transform
    on meta tensors; no data is involved)."""
    renamed = rename_keys(list(shapes), converter)
    if converter.transform is None:
        return {new: tuple(shapes[old]) for new, old in renamed.items()}
    dtypes = dtypes or {}
    meta = {new: _meta(shapes[old], dtypes.get(old, "F32")) for new, old in renamed.items()}
    with _meta_ops_mode():
        out = resolve(converter.transform)(meta)
    return {k: tuple(v.shape) for k, v in out.items()}


class LazyStateDict(Mapping[str, Any]):
    """A read-only ``{key: tensor}`` whose tensors are made on access by per-key loaders.

    ``shapes`` (and ``dtypes``, safetensors names) are known without loading anything.
    """

    def __init__(
        self, loaders: dict[str, Callable[[], Any]], shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]
    ) -> None:
        self._loaders = loaders
        self.shapes = shapes
        self.dtypes = dtypes

    def __getitem__(self, key: str) -> Any:
        return self._loaders[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def __contains__(self, key: object) -> bool:
        return key in self._loaders


def _traced_class() -> type:
    import torch
    from torch.utils._pytree import tree_leaves

    class Traced(torch.Tensor):
        """A meta tensor remembering which source keys it was computed from."""

        @classmethod
        def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            sources: frozenset[str] = frozenset()
            for a in tree_leaves((args, kwargs)):
                if isinstance(a, Traced):
                    sources |= getattr(a, "sources", frozenset())
            out = super().__torch_function__(func, types, args, kwargs)
            for o in tree_leaves(out):
                if isinstance(o, Traced):
                    o.sources = getattr(o, "sources", frozenset()) | sources
            return out

    return Traced


def _plan_transform(
    transform: Callable[[dict[str, Any]], dict[str, Any]],
    shapes: Mapping[str, Sequence[int]],
    dtypes: Mapping[str, str],
) -> tuple[dict[str, str], list[tuple[frozenset[str], list[str]]], dict[str, tuple[int, ...]], dict[str, str]]:
    """Trace ``transform`` on meta tensors: which outputs pass a source tensor through unchanged
    (``{output: source}``), and the groups ``(sources, outputs)`` that need computing."""
    from .state_dict import dtype_name

    traced_cls = _traced_class()
    traced = {}
    for key, shape in shapes.items():
        t = _meta(shape, dtypes[key]).as_subclass(traced_cls)
        t.sources = frozenset((key,))
        traced[key] = t
    with _meta_ops_mode():
        out = transform(dict(traced))
    by_id = {id(t): k for k, t in traced.items()}
    passthrough: dict[str, str] = {}
    needs: dict[str, frozenset[str]] = {}
    for key, value in out.items():
        if id(value) in by_id:
            passthrough[key] = by_id[id(value)]
        else:
            needs[key] = getattr(value, "sources", frozenset())
    # connected components of outputs sharing a source; an output made from nothing needs everything
    groups: list[tuple[frozenset[str], list[str]]] = []
    for key, srcs in needs.items():
        srcs = srcs or frozenset(shapes)
        merged_srcs, merged_outs = set(srcs), [key]
        for g in [g for g in groups if g[0] & srcs]:
            merged_srcs.update(g[0])
            merged_outs.extend(g[1])
            groups.remove(g)
        groups.append((frozenset(merged_srcs), merged_outs))
    out_shapes = {k: tuple(v.shape) for k, v in out.items()}
    out_dtypes = {k: dtype_name(v.dtype) for k, v in out.items()}
    return passthrough, groups, out_shapes, out_dtypes


def own_state_dict(checkpoint: Checkpoint, detection: DetectionResult) -> LazyStateDict:
    """The checkpoint's tensors in the detected model's own layout, made lazily.

    The generic prefix is stripped, the converter (if any) renames keys (views stay memory-mapped)
    and its transform runs only on the source tensors each transformed output needs.
    """
    from ..plugins import get_registry

    n = len(detection.prefix)
    source = {k[n:]: k for k in checkpoint}  # own-prefixless key -> checkpoint key
    shapes = {k: checkpoint.shapes[raw] for k, raw in source.items()}
    dtypes = {k: checkpoint.dtypes[raw] for k, raw in source.items()}
    if detection.converter is None:
        return LazyStateDict({k: _getter(checkpoint, raw) for k, raw in source.items()}, shapes, dtypes)
    converter = get_registry().converters.get(detection.converter)
    renamed = rename_keys(list(source), converter)
    r_shapes = {new: shapes[old] for new, old in renamed.items()}
    r_dtypes = {new: dtypes[old] for new, old in renamed.items()}
    if converter.transform is None:
        loaders = {new: _getter(checkpoint, source[old]) for new, old in renamed.items()}
        return LazyStateDict(loaders, r_shapes, r_dtypes)
    transform = resolve(converter.transform)
    passthrough, groups, out_shapes, out_dtypes = _plan_transform(transform, r_shapes, r_dtypes)
    loaders = {k: _getter(checkpoint, source[renamed[src]]) for k, src in passthrough.items()}
    everything = {new: source[old] for new, old in renamed.items()}
    for srcs, outputs in groups:
        group = _Group(
            converter.name, transform, checkpoint, {k: source[renamed[k]] for k in srcs}, outputs, everything
        )
        for key in outputs:
            loaders[key] = group.loader(key)
    order = [k for k in out_shapes if k in loaders]
    return LazyStateDict({k: loaders[k] for k in order}, out_shapes, out_dtypes)


def _getter(checkpoint: Checkpoint, key: str) -> Callable[[], Any]:
    return lambda: checkpoint[key]


class _Group:
    """Transformed outputs computed together from one set of source tensors, released as taken."""

    def __init__(
        self,
        name: str,
        transform: Callable[[dict[str, Any]], dict[str, Any]],
        checkpoint: Checkpoint,
        sources: dict[str, str],
        outputs: list[str],
        fallback: dict[str, str],
    ) -> None:
        self.name, self.transform, self.checkpoint = name, transform, checkpoint
        self.sources, self.outputs, self.fallback = sources, outputs, fallback
        self.cache: dict[str, Any] = {}

    def _run(self, sources: dict[str, str]) -> dict[str, Any]:
        return self.transform({k: self.checkpoint[raw] for k, raw in sources.items()})

    def loader(self, key: str) -> Callable[[], Any]:
        def load() -> Any:
            if key not in self.cache:
                try:
                    result = self._run(self.sources)
                    if not all(k in result for k in self.outputs):
                        raise KeyError("incomplete")
                except Exception:  # the transform needs more than its traced sources
                    log.debug("converter %r: transform needs the whole state dict", self.name)
                    try:
                        result = self._run(self.fallback)
                    except Exception as exc:
                        raise ConversionError(
                            f"converter {self.name!r}: transform failed: {type(exc).__name__}: {exc}"
                        ) from exc
                self.cache = {k: result[k] for k in self.outputs if k in result}
            if key not in self.cache:
                raise ConversionError(f"converter {self.name!r}: transform did not produce {key!r}")
            return self.cache.pop(key)

        return load


# ---------------------------------------------------------------- writing other formats


def to_foreign_layout(
    tensors: Mapping[str, Any],
    inverse_rename: Any,
    inverse_transform: Any = None,
    *,
    name: str = "converter",
    strict: bool = False,
) -> dict[str, Any]:
    """A state dict in a model's own layout -> a converter's source layout (``inverse_transform``,
    then ``inverse_rename``; lazy references allowed). Works on meta tensors, so plugins use it to
    build the key sets of released checkpoints. ``strict``: a key without a name there is an error
    instead of being dropped."""
    if inverse_transform is not None:
        tensors = resolve(inverse_transform)(dict(tensors))
    inverse = resolve(inverse_rename)
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        new = inverse(key)
        if new is None:
            if strict:
                raise ConversionError(f"{name}: no name in the target layout for {key!r}")
            continue
        if new in out:
            raise ConversionError(f"{name}: two keys map back to {new!r}")
        out[new] = value
    return out


def convert_checkpoint(inputs: PathArg | Sequence[PathArg], to_format: str, output: PathArg) -> Path:
    """Write the checkpoint ``inputs`` (file, shards, folder) as one safetensors file in format
    ``to_format`` (the model's own format, or the ``source_format`` of a checkpoint converter
    targeting it with an inverse). Returns the written path."""
    from ..plugins import get_registry
    from .detect import detect_header
    from .state_dict import open_checkpoint, read_checkpoint_header, save_safetensors

    header = read_checkpoint_header(inputs)
    detection = detect_header(header)
    spec = get_registry().models.get(detection.model)
    targets = {normalize_name(spec.format): None}
    for conv in checkpoint_converters():
        if normalize_name(conv.target_model) == normalize_name(spec.name) and conv.inverse_rename is not None:
            targets.setdefault(normalize_name(conv.source_format), conv)
    want = normalize_name(to_format)
    if want not in targets:
        raise ConversionError(
            f"cannot write {detection.model} in format {to_format!r}; formats available for it: "
            f"{', '.join(sorted(targets))}. A plugin adds formats with a ConverterSpec that has an inverse."
        )
    converter = targets[want]
    with open_checkpoint(header) as ckpt:
        own = own_state_dict(ckpt, detection)
        tensors = {k: own[k] for k in own}
        if converter is not None:
            tensors = to_foreign_layout(
                tensors, converter.inverse_rename, converter.inverse_transform, name=converter.name
            )
        out = Path(os.fspath(output))
        if out.is_dir():
            out = out / f"{detection.model}.{want}.safetensors"
        # "format": "pt" is what transformers/diffusers expect of a torch safetensors file;
        # the layout goes in its own key.
        metadata = {"format": "pt", "difforge_format": want, "difforge_model": detection.model}
        save_safetensors(tensors, out, metadata)
    log.info("wrote %s (%s, format %s, %d tensors)", out, detection.model, want, len(tensors))
    return out
