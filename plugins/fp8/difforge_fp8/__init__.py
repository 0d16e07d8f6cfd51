"""difforge-fp8: store linear and conv weights in fp8, upcast per layer at forward time.

Two dtype backends (``offload=["fp8", ...]``), applied by the core before any location backend:

- ``fp8``: weights cast to ``float8_e4m3fn`` (``format="e5m2"`` for ``float8_e5m2``), clipped at the
  format's largest value (448 for e4m3);
- ``fp8-scaled``: one float32 scale per output channel (``amax / fp8_max``), so that rows with large
  and rows with small weights both use fp8's full range.

Weights matching the model's ``ModelSpec.keep_high_precision`` globs (norms, embeddings, first and
last projections), or the ``exclude`` option, are never cast. Options: ``format`` (``"e4m3"`` or
``"e5m2"``), ``components`` (slot names; default every model component), ``exclude`` (more globs),
``keep_original`` (keep the high-precision weights in memory for an exact ``remove()``; weights
that can be re-read from their checkpoint are restored exactly without it), ``scaled_mm`` (compute
linear layers with ``torch._scaled_mm`` on GPUs that have fp8 matmuls; elsewhere the upcast path).

This entry module is light: the implementation (:mod:`difforge_fp8.cast`) is named lazily.
"""

from __future__ import annotations

from collections.abc import Iterator

from difforge import OffloadSpec, hookimpl

difforge_api = ">=1,<2"

OPTIONS = {"format": "e4m3", "components": None, "exclude": (), "keep_original": False, "scaled_mm": False}


@hookimpl
def difforge_register_offload_backends() -> Iterator[OffloadSpec]:
    yield OffloadSpec(
        name="fp8",
        kind="dtype",
        apply="difforge_fp8.cast:apply_fp8",
        options=OPTIONS,
        description="linear/conv weights stored as float8 (e4m3, or e5m2), upcast per layer at forward time",
    )
    yield OffloadSpec(
        name="fp8-scaled",
        kind="dtype",
        apply="difforge_fp8.cast:apply_fp8_scaled",
        options=OPTIONS,
        description="fp8 with one scale per output channel: large and small weights keep their accuracy",
    )
