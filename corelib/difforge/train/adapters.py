"""What training attaches to a model, all removable: trainable LoRA adapters and gradient checkpointing.

- :class:`TrainableLora`: ``scale * B(A(x))`` added to the output of the chosen ``nn.Linear`` layers by
  forward hooks (``A`` uniform as PEFT initialises it, drawn from ``seed``; ``B`` zero: training starts from the unchanged model). Its
  parameters live in this module, so an optimizer (and ``accelerate``) sees exactly them. It exports in
  the model's own LoRA grammar (:mod:`difforge.lora.keys`), which the family's LoRA converters write as
  diffusers/PEFT (or any other format they know).
- :class:`GradientCheckpointing`: every block of the model's :class:`~difforge.BlockLayout` is replaced in
  its ``ModuleList`` by a stand-in that runs it under ``torch.utils.checkpoint`` (activations recomputed
  in the backward pass). The stand-in shares the block's parameter and child tables, so names and
  ``state_dict`` keys are unchanged; ``remove()`` puts the blocks back.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["TrainableLora", "GradientCheckpointing", "block_lists", "lora_targets"]


def block_lists(model: nn.Module, layout: Any) -> list[tuple[str, nn.ModuleList]]:
    """``[(path, ModuleList)]`` of the layout's block groups."""
    out = []
    for group in layout.groups:
        blocks = model.get_submodule(group.path)
        if not isinstance(blocks, nn.ModuleList):
            raise ConfigError(f"{type(model).__name__}.{group.path} is not a ModuleList of blocks (block layout)")
        out.append((group.path, blocks))
    return out


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def lora_targets(model: nn.Module, patterns: str | Sequence[str] | None, layout: Any = None) -> list[str]:
    """Names of the ``nn.Linear`` layers a LoRA trains: those matching ``patterns`` (comma-separated), or
    without patterns every linear layer inside the layout's blocks (every linear layer without a layout)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if patterns is None or patterns == "" or patterns == []:
        if layout is None:
            return linears
        prefixes = tuple(f"{path}." for path, _ in block_lists(model, layout))
        return [n for n in linears if n.startswith(prefixes)]
    items = [p.strip() for p in patterns.split(",")] if isinstance(patterns, str) else [str(p).strip() for p in patterns]
    items = [p for p in items if p]
    names = [n for n in linears if any(_matches(n, p) for p in items)]
    unmatched = [p for p in items if not any(_matches(n, p) for n in linears)]
    if unmatched or not names:
        examples = ", ".join(sorted({n.split(".", 2)[-1] for n in linears})[:12])
        raise ConfigError(
            f"train: --lora_target_modules {', '.join(map(repr, unmatched or items))} match(es) no linear layer of "
            f"{type(model).__name__}; its linear layers are named like: {examples}"
        )
    return names


class TrainableLora(nn.Module):
    """Trainable LoRA adapters on ``model``'s linear layers ``names`` (see the module docstring)."""

    def __init__(self, model: nn.Module, names: Sequence[str], rank: int, alpha: float | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self.names = list(names)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self._handles: list[Any] = []
        ref = next(model.parameters())
        generator = torch.Generator().manual_seed(seed)
        for name in self.names:
            layer = model.get_submodule(name)
            if not isinstance(layer, nn.Linear):
                raise ConfigError(f"train: LoRA target {name} is a {type(layer).__name__}, not a linear layer")
            # PEFT's initialisation (kaiming_uniform_ with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), from ``seed``
            bound = 1.0 / math.sqrt(layer.in_features)
            a = (torch.rand(self.rank, layer.in_features, generator=generator) * 2 - 1) * bound
            a = a.to(ref.device)
            key = self._key(name)
            self.lora_A[key] = nn.Parameter(a)
            self.lora_B[key] = nn.Parameter(torch.zeros(layer.out_features, self.rank, device=ref.device, dtype=torch.float32))
        try:
            for name in self.names:
                self._handles.append(model.get_submodule(name).register_forward_hook(self._hook(self._key(name))))
        except BaseException:
            self.remove()
            raise

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _hook(self, key: str) -> Any:
        def hook(layer: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            a, b = self.lora_A[key], self.lora_B[key]
            return output + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * self.scale

        return hook

    def remove(self) -> None:
        """Take the adapters off the model (it computes exactly what it did before)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def own_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{module: {"A", "B", "alpha"}}`` in the model's own layout, on the CPU."""
        return {
            name: {
                "A": self.lora_A[self._key(name)].detach().float().cpu(),
                "B": self.lora_B[self._key(name)].detach().float().cpu(),
                "alpha": torch.tensor(self.alpha),
            }
            for name in self.names
        }


class _CheckpointedBlock(nn.Module):
    """Stands in for a block: runs it under ``torch.utils.checkpoint`` while gradients are enabled."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        d = self.__dict__
        d["_parameters"], d["_buffers"], d["_modules"] = block._parameters, block._buffers, block._modules
        d["_non_persistent_buffers_set"] = block._non_persistent_buffers_set
        d["_block"] = block
        self.training = block.training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        block = self.__dict__["_block"]
        if torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def train(self, mode: bool = True) -> _CheckpointedBlock:
        self.__dict__["_block"].train(mode)
        self.training = mode
        return self


class GradientCheckpointing:
    """Checkpoint every block of ``model``'s block layout; ``remove()`` restores the blocks."""

    def __init__(self, model: nn.Module, layout: Any) -> None:
        if layout is None:
            raise ConfigError(
                f"train: --use_gradient_checkpointing needs the model's block layout, and {type(model).__name__}'s "
                "ModelSpec declares none"
            )
        self._installed: list[tuple[nn.ModuleList, int, nn.Module]] = []
        try:
            for _, blocks in block_lists(model, layout):
                for i, block in enumerate(blocks):
                    blocks[i] = _CheckpointedBlock(block)
                    self._installed.append((blocks, i, block))
        except BaseException:
            self.remove()
            raise

    @property
    def count(self) -> int:
        return len(self._installed)

    def remove(self) -> None:
        for blocks, i, block in reversed(self._installed):
            blocks[i] = block
        self._installed = []

    def __enter__(self) -> GradientCheckpointing:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
