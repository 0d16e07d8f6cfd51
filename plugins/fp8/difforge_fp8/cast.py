"""fp8 weight storage with a per-layer upcast at forward time.

For every cast layer the ``weight`` Parameter is swapped for an fp8 one (plus, for ``fp8-scaled``, a
float32 buffer ``weight_fp8_scale`` of one scale per output channel), and the layer's ``forward`` is
wrapped on that instance only: the wrapper puts the weight upcast to the compute dtype in place for
the duration of the call and restores the fp8 one in a ``finally``, so a forward that raises leaves
the layer as it was. Location backends applied afterwards (``cpu``, ``sequential``, ``disk``) move or
stream the fp8 weights and scales like any other tensor, so ``offload=["fp8", "disk"]`` composes.
When ``disk`` is among the pipeline's offload choices, the components it will hold are cast layer by
layer into a file of their own (:class:`_Spill`), mapped back lazily, and ``disk`` reads them from
there: setup holds about one layer's fp8 weights instead of all of them.

``remove()`` restores each layer's forward and weight exactly: from the original kept in memory
(``keep_original=True``), else re-read from the checkpoint the model was loaded from (via
:func:`difforge.builtin.offload.checkpoint_loaders`); only a weight with neither comes back as its
fp8 values upcast to the original dtype (logged when the backend is applied).
"""

from __future__ import annotations

import fnmatch
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difforge import ConfigError, DifforgeError
from difforge.builtin.offload import LOCATION_MARK, SOURCE_ATTR, FileReader, checkpoint_loaders

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "Fp8Handle", "apply_fp8", "apply_fp8_scaled", "cast_module", "dequantize", "quantize"]

FORMATS: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
SCALE = "weight_fp8_scale"
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CAST_TYPES = (nn.Linear, *CONV, *CONV_TRANSPOSE)


def quantize(weight: torch.Tensor, dtype: torch.dtype, *, scaled: bool, channel_dim: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight`` in fp8 ``dtype``, and its per-output-channel float32 scale when ``scaled``.

    Unscaled, values beyond the format's range are clipped to its largest value. Scaled, each
    output channel (``channel_dim``) is divided by ``amax / fp8_max`` first; the scale has the
    weight's rank (size 1 except along ``channel_dim``) so that it broadcasts. Work is done a few
    million elements at a time, so the float32 temporaries stay small for any layer size.
    """
    fmax = torch.finfo(dtype).max
    q = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    if not scaled:
        for rows in _row_chunks(weight):
            q[rows] = weight[rows].clamp(-fmax, fmax)
        return q, None
    dims = [d for d in range(weight.dim()) if d != channel_dim]
    if channel_dim != 0:  # (transposed convolutions: small) all at once
        w = weight.to(torch.float32, copy=True)
        scale = _scale(torch.linalg.vector_norm(w, float("inf"), dim=dims, keepdim=True), fmax)
        return w.div_(scale).clamp_(-fmax, fmax).to(dtype), scale
    scale = torch.empty((weight.shape[0],) + (1,) * (weight.dim() - 1), dtype=torch.float32, device=weight.device)
    for rows in _row_chunks(weight):
        w = weight[rows].to(torch.float32, copy=True)  # a copy even for fp32 weights: divided in place below
        scale[rows] = _scale(torch.linalg.vector_norm(w, float("inf"), dim=dims, keepdim=True) if dims else w.abs(), fmax)
        q[rows] = w.div_(scale[rows]).clamp_(-fmax, fmax)
    return q, scale


def _scale(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    return torch.where(amax > 0, amax / fmax, torch.ones_like(amax))


def _row_chunks(weight: torch.Tensor, elements: int = 1 << 22) -> list[slice]:
    """Slices of whole rows (dim 0) of about ``elements`` elements each."""
    step = max(1, elements // max(1, weight[0].numel())) if len(weight) else 1
    return [slice(i, i + step) for i in range(0, len(weight), step)]


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The fp8 weight ``q`` (times ``scale``) in ``dtype``."""
    w = q.to(dtype)
    return w if scale is None else w.mul_(scale.to(dtype))


def _fp8_matmul_ok(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether ``torch._scaled_mm`` can serve this linear call (CUDA, compute capability 8.9+, e4m3)."""
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and q.dtype == torch.float8_e4m3fn
        and hasattr(torch, "_scaled_mm")
        and torch.cuda.get_device_capability(x.device) >= (8, 9)
        and x.shape[-1] % 16 == 0
        and q.shape[0] % 16 == 0
    )


def _scaled_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (q * scale).T + bias`` with fp8 operands: ``x`` quantised per row (dynamic scales)."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    x2 = x.reshape(-1, x.shape[-1])
    x_scale = (x2.abs().amax(dim=-1, keepdim=True).float() / fmax).clamp(min=1e-12)
    xq = (x2.float() / x_scale).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
    w_scale = scale.reshape(1, -1) if scale is not None else torch.ones(1, q.shape[0], device=q.device)
    out = torch._scaled_mm(xq, q.t(), scale_a=x_scale, scale_b=w_scale.float(), bias=bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], q.shape[0])


@dataclass(eq=False)
class _Layer:
    """A cast layer and what ``remove()`` needs to undo it."""

    module: nn.Module
    key: str
    inner: Callable[..., Any] | None  # the instance's own ``forward`` before ours, if it had one
    dtype: torch.dtype  # the original weight dtype (and fallback compute dtype)
    requires_grad: bool
    original: torch.Tensor | None  # kept when keep_original
    reload: Callable[[], torch.Tensor] | None  # re-reads the original from the checkpoint
    scaled_mm: bool

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        q = module._parameters["weight"]
        scale = module._buffers.get(SCALE)
        x = args[0] if args else next(iter(kwargs.values()), None)
        dtype = x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() else self.dtype
        if self.scaled_mm and isinstance(module, nn.Linear) and isinstance(x, torch.Tensor) and _fp8_matmul_ok(x, q):
            try:
                return _scaled_linear(x, q, scale, module.bias)
            except RuntimeError as exc:  # this torch/GPU refuses the shapes or scales: upcast from now on
                log.warning("fp8: torch._scaled_mm failed on %s (%s); using the upcast path for this layer", self.key, exc)
                self.scaled_mm = False
        module._parameters["weight"] = nn.Parameter(dequantize(q, scale, dtype), requires_grad=False)
        try:
            return (self.inner or type(module).forward.__get__(module))(*args, **kwargs)
        finally:
            module._parameters["weight"] = q


class _Spill:
    """fp8 weights and scales written to a file of their own as they are cast (for ``disk``, which applies next).

    Each layer's tensors are appended (64-byte aligned) and freed at once, so setup holds about one layer's
    weights rather than all of them. :meth:`finish` maps the file back lazily (pages are read only when
    touched) and gives each tensor a :data:`SOURCE_ATTR` reader (plain reads), through which ``disk``
    materialises it per block without writing a scratch copy.
    """

    def __init__(self, path: Path, files: FileReader) -> None:
        self.path, self.files = path, files
        self._out: Any = open(path, "wb")  # noqa: SIM115 -- closed by finish()
        self.nbytes = 0
        self._pending: list[tuple[nn.Module, str, bool, int, torch.dtype, tuple[int, ...]]] = []

    def add(self, module: nn.Module, name: str, is_param: bool, tensor: torch.Tensor) -> None:
        pad = -self.nbytes % 64
        self._out.write(b"\0" * pad)
        offset = self.nbytes + pad
        data = tensor.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy()
        self._out.write(memoryview(data))
        self.nbytes = offset + data.nbytes
        self._pending.append((module, name, is_param, offset, tensor.dtype, tuple(tensor.shape)))

    def finish(self) -> None:
        """Put every spilled tensor in place: a lazily mapped view of the file, with its reader."""
        self._out.close()
        whole = torch.from_file(str(self.path), shared=False, size=self.nbytes, dtype=torch.uint8) if self.nbytes else None
        for module, name, is_param, offset, dtype, shape in self._pending:
            size = torch.Size(shape).numel() * dtype.itemsize
            view = whole[offset : offset + size].view(dtype).view(shape) if size else torch.empty(shape, dtype=dtype)
            if is_param:
                view = nn.Parameter(view, requires_grad=False)
                module._parameters[name] = view
            else:
                module._buffers[name] = view
            read = self.files.reader_at(self.path, offset, size, dtype, shape)
            setattr(view, SOURCE_ATTR, read)
        self._pending.clear()


class Fp8Handle:
    """The cast layers of one or more modules; ``remove()`` restores them (see the module docstring)."""

    def __init__(self, fmt: str, scaled: bool) -> None:
        self.format, self.scaled = fmt, scaled
        self.layers: list[_Layer] = []
        self.roots: list[nn.Module] = []
        self.skipped: list[str] = []
        self.bytes_before = 0
        self.bytes_after = 0
        self.spill_dir: Path | None = None  # fp8 weights of the components a ``disk`` backend will hold
        self.spilled_bytes = 0
        self.files = FileReader()

    def stats(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "scaled": self.scaled,
            "layers": len(self.layers),
            "kept_high_precision": len(self.skipped),
            "weight_bytes_before": self.bytes_before,
            "weight_bytes_after": self.bytes_after,
            "spilled_bytes": self.spilled_bytes,
        }

    def remove(self) -> None:
        offloaded = [m.__dict__[LOCATION_MARK] for m in self.roots if LOCATION_MARK in m.__dict__]
        if offloaded:
            raise DifforgeError(
                f"fp8: cannot remove while the location backend {offloaded[0]!r} holds the weights; "
                "remove the location backend's handle first (handles come off in reverse order)"
            )
        for layer in reversed(self.layers):
            module = layer.module
            q = module._parameters["weight"]
            scale = module._buffers.pop(SCALE, None)
            if layer.original is not None:
                weight = layer.original
            else:
                data = layer.reload() if layer.reload is not None else dequantize(q, scale, layer.dtype)
                weight = nn.Parameter(data.to(device=q.device, dtype=layer.dtype), requires_grad=layer.requires_grad)
            module._parameters["weight"] = weight
            if layer.inner is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = layer.inner
        self.layers.clear()
        self.files.close()
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self.spill_dir = None


def _check_options(options: dict[str, Any], backend: str) -> dict[str, Any]:
    fmt = options.get("format", "e4m3")
    if fmt not in FORMATS:
        raise ConfigError(f"offload backend {backend!r}: format must be one of {', '.join(map(repr, FORMATS))}, got {fmt!r}")
    for name in ("keep_original", "scaled_mm"):
        if not isinstance(options.get(name, False), bool):
            raise ConfigError(f"offload backend {backend!r}: option {name} must be true or false, got {options[name]!r}")
    for name in ("exclude", "components"):
        value = options.get(name)
        if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
            raise ConfigError(f"offload backend {backend!r}: option {name} must be a list of strings, got {value!r}")
    return options


def _protected(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def cast_module(
    module: nn.Module,
    *,
    fmt: str = "e4m3",
    scaled: bool = False,
    keep_high_precision: Iterable[str] = (),
    keep_original: bool = False,
    scaled_mm: bool = False,
    torch_dtype: torch.dtype | None = None,
    handle: Fp8Handle | None = None,
    prefix: str = "",
    spill: _Spill | None = None,
) -> Fp8Handle:
    """Store the weights of ``module``'s linear and conv layers in fp8 (module-level API of the backends).

    ``keep_high_precision``: glob patterns of parameter names never cast. ``torch_dtype``: the dtype
    the module was loaded in (to find weights that can be re-read from its checkpoint). ``spill``: write
    the fp8 tensors to that file as they are cast instead of keeping them in memory (see :class:`_Spill`).
    """
    _check_options({"format": fmt, "keep_original": keep_original, "scaled_mm": scaled_mm}, "fp8-scaled" if scaled else "fp8")
    handle = handle or Fp8Handle(fmt, scaled)
    handle.roots.append(module)
    patterns = tuple(keep_high_precision)
    loaders = checkpoint_loaders(module, torch_dtype)
    fp8 = FORMATS[fmt]
    kept_nothing = 0
    for name, layer in module.named_modules():
        weight = getattr(layer, "weight", None)
        if not isinstance(layer, CAST_TYPES) or not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
            continue
        key = f"{name}.weight" if name else "weight"
        if _protected(key, patterns):
            handle.skipped.append(prefix + key)
            continue
        if weight.is_meta or isinstance(getattr(layer.__dict__.get("forward"), "__self__", None), _Layer):
            raise ConfigError(
                f"fp8: {prefix}{key} is already cast or offloaded; apply one dtype backend, before any location backend"
            )
        reload = loaders.get(key)
        # a zero-copy view of the memory-mapped checkpoint: read it with plain reads instead of faulting in the map
        source = reload() if reload is not None and weight.untyped_storage().nbytes() > weight.nbytes else weight.detach()
        channel_dim = 1 if isinstance(layer, CONV_TRANSPOSE) else 0
        q, scale = quantize(source.to(weight.device), fp8, scaled=scaled, channel_dim=channel_dim)
        del source
        entry = _Layer(
            module=layer, key=prefix + key, inner=layer.__dict__.get("forward"), dtype=weight.dtype,
            requires_grad=weight.requires_grad, original=weight if keep_original else None,
            reload=None if keep_original else reload, scaled_mm=scaled_mm,
        )
        kept_nothing += entry.original is None and entry.reload is None
        handle.bytes_before += weight.nbytes
        handle.bytes_after += q.nbytes + (scale.nbytes if scale is not None else 0)
        if spill is None or q.device.type != "cpu":  # (a spilled weight is mapped back on the CPU)
            layer._parameters["weight"] = nn.Parameter(q, requires_grad=False)
            if scale is not None:
                layer.register_buffer(SCALE, scale, persistent=False)
        else:  # put in place by spill.finish(); until then the layer keeps its original weight
            spill.add(layer, "weight", True, q)
            if scale is not None:
                layer.register_buffer(SCALE, None, persistent=False)
                spill.add(layer, SCALE, False, scale)
        del q, scale
        layer.forward = entry.forward
        handle.layers.append(entry)
    if spill is not None:
        spill.finish()
        handle.spilled_bytes += spill.nbytes
    if kept_nothing:
        log.info(
            "fp8: %d weights of %s cannot be re-read from a checkpoint; remove() will restore their fp8 values "
            "(keep_original=True keeps the originals in memory instead)", kept_nothing, prefix.rstrip(".") or type(module).__name__,
        )
    return handle


def _disk_follows(pipe: Any, models: dict[str, nn.Module]) -> tuple[set[str], Any]:
    """The components a ``disk`` backend among the pipeline's offload choices will hold, and its ``offload_dir``.

    The core records the choices before applying them (dtype backends first), so a dtype backend can see
    that ``disk`` comes next and spill its fp8 weights as it casts them.
    """
    from difforge.plugins import get_registry

    registry = get_registry()
    for choice in getattr(pipe, "offload_choices", None) or ():
        try:
            spec = registry.offload.get(choice.name)
        except DifforgeError:
            continue
        if spec.kind == "location" and spec.name == "disk":
            options = getattr(choice, "options", {}) or {}
            wanted = options.get("components")
            return {s for s in models if wanted is None or s in wanted}, options.get("offload_dir")
    return set(), None


def _apply(pipe: Any, options: dict[str, Any], scaled: bool) -> Fp8Handle:
    backend = "fp8-scaled" if scaled else "fp8"
    _check_options(options, backend)
    models = {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}
    wanted = options.get("components")
    unknown = sorted(set(wanted or ()) - set(models))
    if unknown:
        raise ConfigError(f"offload backend {backend!r}: no model component {', '.join(map(repr, unknown))}; the components are {', '.join(models)}")
    handle = Fp8Handle(options.get("format", "e4m3"), scaled)
    disk_slots, disk_dir = _disk_follows(pipe, models)
    try:
        for slot, module in models.items():
            if wanted is not None and slot not in wanted:
                continue
            spec = pipe._model_spec(slot) if hasattr(pipe, "_model_spec") else None
            spill = None
            if slot in disk_slots:
                if handle.spill_dir is None:
                    if disk_dir is not None:
                        Path(disk_dir).mkdir(parents=True, exist_ok=True)
                    handle.spill_dir = Path(tempfile.mkdtemp(prefix="difforge-fp8-", dir=disk_dir))
                spill = _Spill(handle.spill_dir / f"{slot}.fp8", handle.files)
            cast_module(
                module, fmt=handle.format, scaled=scaled,
                keep_high_precision=(*getattr(spec, "keep_high_precision", ()), *(options.get("exclude") or ())),
                keep_original=options.get("keep_original", False), scaled_mm=options.get("scaled_mm", False),
                torch_dtype=getattr(pipe, "torch_dtype", None), handle=handle, prefix=f"{slot}.", spill=spill,
            )
    except BaseException:
        handle.remove()
        raise
    stats = handle.stats()
    log.info(
        "%s: %d layers cast to %s (%.1f MiB -> %.1f MiB), %d kept in high precision",
        backend, stats["layers"], handle.format, stats["weight_bytes_before"] / 2**20, stats["weight_bytes_after"] / 2**20,
        stats["kept_high_precision"],
    )
    return handle


def apply_fp8(pipe: Any, options: dict[str, Any]) -> Fp8Handle:
    """``offload="fp8"``: plain fp8 casting (clipped at the format's range)."""
    return _apply(pipe, options, scaled=False)


def apply_fp8_scaled(pipe: Any, options: dict[str, Any]) -> Fp8Handle:
    """``offload="fp8-scaled"``: fp8 with per-output-channel scales."""
    return _apply(pipe, options, scaled=True)
