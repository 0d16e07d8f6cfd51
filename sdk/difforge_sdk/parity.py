"""Compare a module's or a pipeline's output with a reference (diffusers, transformers, another backend).

Outputs of any shape are compared: a tensor, a tuple or list, a ``NamedTuple`` or dataclass of
tensors, a dict, a PIL image or a numpy array. Each leaf gets a line in the :class:`ParityReport`
(max abs diff, mean abs diff, relative L2 error), so a failing assertion says *which* output is off
and by how much::

    from difforge_sdk.parity import assert_close

    assert_close(ours(x), reference(x).sample, atol=1e-4, name="FluxAE.decode vs diffusers")

DESIGN.md's tolerances (fp32, tiny configs, same weights): modules 1e-4 max abs, pipelines 1e-3
(:data:`MODULE_ATOL`, :data:`PIPELINE_ATOL`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MODULE_ATOL", "PIPELINE_ATOL", "LeafDiff", "ParityReport", "flatten", "compare", "assert_close"]

MODULE_ATOL = 1e-4
PIPELINE_ATOL = 1e-3


def flatten(output: Any, prefix: str = "output") -> dict[str, Any]:
    """``{path: tensor}`` of every tensor-like leaf of ``output`` (None leaves are dropped).

    Paths read like code: ``output.last_hidden_state``, ``output[0]``, ``output['img']``.
    """
    return dict(_leaves(output, prefix))


def _leaves(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    import torch

    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif hasattr(obj, "_fields"):  # NamedTuple
        for name in obj._fields:
            yield from _leaves(getattr(obj, name), f"{path}.{name}")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _leaves(value, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{path}[{i}]")
    elif hasattr(obj, "__array__") or type(obj).__module__.startswith("PIL."):
        import numpy as np

        yield path, torch.from_numpy(np.asarray(obj).copy())
    elif isinstance(obj, (int, float, bool)):
        yield path, torch.tensor(obj)
    else:
        raise TypeError(f"{path}: cannot compare a {type(obj).__name__}; return tensors (or tuples/dicts of them)")


@dataclass(frozen=True)
class LeafDiff:
    """How one output tensor differs from its reference."""

    path: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    rel_l2: float
    ref_max: float
    problem: str | None = None
    """A shape, dtype-kind or finiteness mismatch that makes the numbers meaningless."""

    def line(self) -> str:
        if self.problem:
            return f"{self.path}: {self.problem}"
        return (
            f"{self.path} {list(self.shape)}: max abs diff {self.max_abs:.3g}, mean abs diff {self.mean_abs:.3g}, "
            f"relative L2 {self.rel_l2:.3g} (reference max |x| {self.ref_max:.3g})"
        )


@dataclass
class ParityReport:
    """The result of :func:`compare`: one :class:`LeafDiff` per output tensor, and the verdict."""

    name: str
    atol: float
    rtol: float
    leaves: list[LeafDiff] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return max((d.max_abs for d in self.leaves), default=0.0)

    def failures(self) -> list[str]:
        out = [f"missing output {p}" for p in self.missing] + [f"unexpected output {p}" for p in self.extra]
        for d in self.leaves:
            if d.problem or not d.max_abs <= self.atol + self.rtol * d.ref_max:
                out.append(d.line())
        return out

    @property
    def ok(self) -> bool:
        return not self.failures()

    def __str__(self) -> str:
        tol = f"atol {self.atol:g}" + (f" + rtol {self.rtol:g} * max|reference|" if self.rtol else "")
        head = f"{self.name}: {'agrees' if self.ok else 'DIFFERS'} ({tol})"
        lines = [d.line() for d in self.leaves]
        lines += [f"missing output {p}" for p in self.missing] + [f"unexpected output {p}" for p in self.extra]
        return "\n".join([head, *(f"  {line}" for line in lines)])


def compare(got: Any, want: Any, *, atol: float = MODULE_ATOL, rtol: float = 0.0, name: str = "output") -> ParityReport:
    """Compare every tensor of ``got`` with the same leaf of ``want`` (computed in float64)."""
    import torch

    ours, ref = flatten(got), flatten(want)
    report = ParityReport(name, atol, rtol, missing=[p for p in ref if p not in ours], extra=[p for p in ours if p not in ref])
    for path in (p for p in ref if p in ours):
        a, b = ours[path].detach(), ref[path].detach()
        shape = tuple(b.shape)
        if tuple(a.shape) != shape:
            report.leaves.append(LeafDiff(path, shape, math.inf, math.inf, math.inf, 0.0, f"shape {list(a.shape)}, reference {list(shape)}"))
            continue
        if a.is_complex() or b.is_complex():
            a, b = torch.view_as_real(a.resolve_conj()), torch.view_as_real(b.resolve_conj())
        a, b = a.to("cpu", torch.float64), b.to("cpu", torch.float64)
        problem = None
        if not torch.equal(a.isfinite(), b.isfinite()):
            problem = f"non-finite values differ ({int((~a.isfinite()).sum())} vs {int((~b.isfinite()).sum())} in the reference)"
        finite = a.isfinite() & b.isfinite()
        diff = (a - b).abs()[finite]
        ref_abs = b.abs()[finite]
        norm = float(b[finite].norm()) if diff.numel() else 0.0
        err = float((a - b)[finite].norm()) if diff.numel() else 0.0
        report.leaves.append(
            LeafDiff(
                path,
                shape,
                max_abs=float(diff.max()) if diff.numel() else 0.0,
                mean_abs=float(diff.mean()) if diff.numel() else 0.0,
                rel_l2=err / norm if norm else (math.inf if err else 0.0),
                ref_max=float(ref_abs.max()) if ref_abs.numel() else 0.0,
                problem=problem,
            )
        )
    return report


def assert_close(got: Any, want: Any, *, atol: float = MODULE_ATOL, rtol: float = 0.0, name: str = "output") -> ParityReport:
    """:func:`compare`, raising ``AssertionError`` with the whole report when anything differs."""
    report = compare(got, want, atol=atol, rtol=rtol, name=name)
    if not report.ok:
        raise AssertionError(str(report))
    return report


def build_from(sd: Mapping[str, Any], cls: type, config: Any) -> Any:
    """``cls(config)`` built on the meta device with the weights ``sd`` assigned, as the core loader
    does: the way to put a reference model's weights (after a converter) into ours."""
    import torch

    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(dict(sd), strict=True, assign=True)
    return model.eval()
