"""Applying LoRA deltas to layers: merged into the weight ("fused"), or added at run time ("hot").

- :class:`LoraDelta` is one module's low-rank update, checked against the module it targets.
- :class:`FusedWeight` owns a weight that fused LoRAs changed: it keeps the original tensor (the very
  same storage for weights in CPU memory, a CPU copy otherwise) and recomputes
  ``original + sum(scale * delta)`` in float32 whenever a LoRA or a scale changes, so clearing the
  last LoRA puts back the original bits.
- :class:`HotLayer` is a removable forward hook on one ``nn.Linear``/``nn.Conv*d`` adding
  ``scale * B(A(x))`` to its output. It never touches the weight, so it works on fp8-stored and
  offloaded layers; removing it restores the layer exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DifforgeError

__all__ = ["LoraDelta", "FusedWeight", "HotLayer", "make_delta", "fuse_problem"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(eq=False)
class LoraDelta:
    """The update ``(alpha / r) * B @ A`` of one module (``alpha`` None: scale 1), on output rows
    ``rows`` of its weight (None: all). ``A``/``B`` are kept as loaded, on the CPU."""

    module: str
    A: torch.Tensor
    B: torch.Tensor  # [n, r]
    alpha: float | None
    rows: tuple[int, int] | None
    out_features: int
    _cache: dict[tuple[Any, Any], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def tensors(self, device: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` on ``device`` in ``dtype`` (cached: hot layers ask at every forward)."""
        key = (torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = (self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype))
        return self._cache[key]

    def weight_delta(self, shape: torch.Size, device: Any) -> torch.Tensor:
        """``B @ A`` in float32, shaped like the weight rows it covers."""
        a = self.A.to(device=device, dtype=torch.float32).reshape(self.rank, -1)
        b = self.B.to(device=device, dtype=torch.float32)
        n = b.shape[0]
        return (b @ a).reshape(n, *shape[1:])

    def own_group(self, with_alpha: bool = False) -> dict[str, torch.Tensor]:
        """The own-layout LoRA group (``B`` padded to the whole weight), for export. ``with_alpha``: write
        ``alpha = r`` (scale 1) rather than nothing, as formats need when other modules carry an alpha
        (diffusers reads a missing alpha as the file's most common one)."""
        B = self.B
        if self.rows is not None:
            B = self.B.new_zeros((self.out_features, *self.B.shape[1:]))
            B[self.rows[0] : self.rows[1]] = self.B
        group = {"A": self.A, "B": B}
        if self.alpha is not None or with_alpha:
            group["alpha"] = torch.tensor(float(self.rank) if self.alpha is None else self.alpha)
        return group


def _layer_sizes(module: nn.Module) -> tuple[int, int, tuple[int, ...]] | None:
    """``(in, out, kernel)`` of a layer a LoRA can target, None for other modules."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, ()
    if isinstance(module, _CONV) and module.groups == 1:
        return module.in_channels, module.out_channels, tuple(module.kernel_size)
    return None


def make_delta(model: nn.Module, module: str, group: Mapping[str, Any]) -> LoraDelta | str:
    """A checked :class:`LoraDelta` for ``model``'s ``module`` from an own-layout group, or a string
    saying what does not fit (missing tensor, no such module, wrong shape)."""
    if "A" not in group or "B" not in group:
        return f"{module}: has {' and '.join(sorted(group))} but not both lora_A and lora_B"
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        return f"{module}: no such module in {type(model).__name__}"
    sizes = _layer_sizes(layer)
    if sizes is None:
        return f"{module}: a {type(layer).__name__}, not a linear or (ungrouped) convolution layer a LoRA can change"
    n_in, n_out, kernel = sizes
    A, B = group["A"], group["B"]
    r = A.shape[0] if A.dim() else 0
    want_a = [(r, n_in, *kernel)] + ([(r, n_in)] if all(k == 1 for k in kernel) else [])
    if tuple(A.shape) not in want_a and not (not kernel and tuple(A.shape) == (r, n_in, 1, 1)):
        return f"{module}: lora_A has shape {tuple(A.shape)}, the layer needs {want_a[0]} (in={n_in})"
    if B.dim() < 2 or B.shape[1] != r or any(d != 1 for d in B.shape[2:]):
        return f"{module}: lora_B has shape {tuple(B.shape)}, expected [n, {r}] to match lora_A's rank {r}"
    rows = group.get("rows")
    rows = None if rows is None else (int(rows[0]), int(rows[1]))
    if rows is not None and (rows == (0, n_out)):
        rows = None
    n = B.shape[0]
    if rows is None and n != n_out:
        return f"{module}: lora_B has {n} output rows, the layer has {n_out}"
    if rows is not None and (kernel or not (0 <= rows[0] < rows[1] <= n_out) or rows[1] - rows[0] != n):
        return f"{module}: lora rows {rows} do not fit a layer of {n_out} outputs with lora_B of {n} rows"
    alpha = group.get("alpha")
    A = A.reshape(r, n_in, *kernel) if kernel else A.reshape(r, n_in)
    return LoraDelta(module, A, B.reshape(n, r), None if alpha is None else float(alpha), rows, n_out)


def fuse_problem(model: nn.Module, module: str) -> str | None:
    """Why ``module``'s weight cannot take a fused LoRA (None: it can)."""
    weight = getattr(model.get_submodule(module), "weight", None)
    if not isinstance(weight, torch.Tensor):
        return f"{module} has no weight tensor"
    if weight.is_meta:
        return f"{module}'s weight is held by a streaming offload backend (sequential/disk) between forwards"
    if not weight.is_floating_point() or weight.element_size() < 2:
        return f"{module}'s weight is stored in {weight.dtype} (a dtype backend such as fp8)"
    return None


class FusedWeight:
    """A weight changed by fused LoRAs: ``original + sum(scale * delta)``, recomputed on every change."""

    def __init__(self, layer: nn.Module, name: str) -> None:
        self.layer, self.name = layer, name
        self.param: torch.Tensor = layer.weight
        data = self.param.data
        self.original = data if data.device.type == "cpu" else data.to("cpu")
        self.deltas: dict[str, tuple[LoraDelta, float]] = {}

    def _check(self) -> None:
        if self.layer._parameters.get("weight") is not self.param:
            raise DifforgeError(
                f"LoRA: the weight of {self.name} was replaced since a LoRA was fused into it (an offload or "
                "dtype backend applied by hand?); change offload backends with pipe.set_offload, which takes "
                "fused LoRAs out of the weights around the change, or clear the LoRA first"
            )

    def set(self, lora: str, delta: LoraDelta | None, scale: float = 1.0) -> None:
        """Add, rescale (``delta`` given) or drop (``delta`` None) one LoRA's delta, then recompute."""
        self._check()
        if delta is None:
            self.deltas.pop(lora, None)
        else:
            self.deltas[lora] = (delta, scale)
        self.recompute()

    def recompute(self) -> None:
        param = self.param
        if not self.deltas:
            self.param.data = self.original if self.original.device == param.device else self.original.to(param.device)
            return
        w = self.original.to(device=param.device, dtype=torch.float32, copy=True)
        for delta, scale in self.deltas.values():
            s = delta.scale * scale
            if s == 0:
                continue
            rows = w if delta.rows is None else w[delta.rows[0] : delta.rows[1]]
            rows.add_(delta.weight_delta(w.shape, w.device), alpha=s)
        param.data = w.to(param.dtype)


class HotLayer:
    """A forward hook adding the LoRA branches of one layer; ``remove()`` takes it off."""

    def __init__(self, layer: nn.Module, name: str) -> None:
        self.layer, self.name = layer, name
        self.deltas: dict[str, tuple[LoraDelta, float]] = {}
        self._handle = layer.register_forward_hook(self._hook, with_kwargs=True)

    def set(self, lora: str, delta: LoraDelta | None, scale: float = 1.0) -> None:
        if delta is None:
            self.deltas.pop(lora, None)
        else:
            self.deltas[lora] = (delta, scale)

    def remove(self) -> None:
        self._handle.remove()
        self.deltas.clear()

    def _hook(
        self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
    ) -> torch.Tensor:
        x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
        total = None
        for delta, scale in self.deltas.values():
            s = delta.scale * scale
            if s == 0:
                continue
            A, B = delta.tensors(x.device, x.dtype)
            if isinstance(layer, nn.Linear):
                d = F.linear(F.linear(x, A), B)
                if delta.rows is not None:
                    d = F.pad(d, (delta.rows[0], delta.out_features - delta.rows[1]))
            else:
                mid = layer._conv_forward(x, A, None)
                d = _CONV_FN[A.dim() - 2](mid, B.reshape(*B.shape, *([1] * (A.dim() - 2))))
            d = d * s
            total = d if total is None else total + d
        return output if total is None else output + total
