"""A recording attention backend the conformance suite registers beside the installed plugins.

``conformance-probe`` computes exactly what the core's ``math`` backend computes (the reference) and
records the :class:`~difforge.AttentionQuery` of every call made inside :func:`recording`, so the
suite knows which calls a model makes and can ask every other backend whether it supports them.
Its priority is the lowest possible: ``auto`` never picks it. Register :data:`PLUGIN` (an object,
not this module, so the plugin host does not search the installed distributions for its owner).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

from difforge import AttentionQuery, AttentionSpec, hookimpl

NAME = "conformance-probe"
_queries: contextvars.ContextVar[list[AttentionQuery] | None] = contextvars.ContextVar("difforge_probe", default=None)


class _Probe:
    difforge_api = ">=1,<2"

    def __init__(self) -> None:
        self.__name__ = "difforge-sdk-conformance"

    @hookimpl
    def difforge_register_attention_backends(self) -> Iterator[AttentionSpec]:
        yield AttentionSpec(
            name=NAME,
            fn="difforge_sdk.testing._probe:attention",
            supports="difforge_sdk.testing._probe:supports",
            priority=-(10**9),
            description="difforge-sdk conformance suite: the math backend, recording every call",
        )


PLUGIN = _Probe()


def supports(query: AttentionQuery) -> bool:
    return True


def attention(q: Any, k: Any, v: Any, *, mask: Any = None, scale: float | None = None) -> Any:
    from difforge.builtin.attention import math_attention
    from difforge.ops.attention import make_query

    queries = _queries.get()
    if queries is not None:
        queries.append(make_query(q, k, v, mask))
    return math_attention(q, k, v, mask=mask, scale=scale)


@contextlib.contextmanager
def recording() -> Iterator[list[AttentionQuery]]:
    """Collect the queries of the probe's calls made inside this block."""
    queries: list[AttentionQuery] = []
    token = _queries.set(queries)
    try:
        yield queries
    finally:
        _queries.reset(token)
