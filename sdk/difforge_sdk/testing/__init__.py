"""difforge_sdk.testing: the conformance suites, and the pytest plugin that carries them.

Installing difforge-sdk registers this module as a pytest plugin (entry point ``pytest11``,
``difforge``). Loaded at every pytest start, it only registers the ``difforge_conformance`` marker:
it imports neither torch nor any difforge plugin, and runs nothing until a test opts in by
subclassing one of the suites::

    from difforge_sdk.testing import ModelConformance

    class TestMyDiT(ModelConformance):
        model = "my-dit"
        tiny_config = MyDiTConfig(hidden_size=32, depth=2)

- :class:`ModelConformance` (:mod:`.conformance`): every check a ``ModelSpec`` must pass;
- :class:`AttentionConformance`, :class:`CacheConformance`, :class:`OffloadConformance`,
  :class:`SchedulerConformance` (:mod:`.kinds`): the checks of the other plugin kinds, run on the
  SDK's toy family.

``pytest -m difforge_conformance`` runs only the suites' checks; ``-m "not difforge_conformance"``
leaves them out.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import pytest

MARK = "difforge_conformance"

_LAZY = {
    "ModelConformance": "difforge_sdk.testing.conformance",
    "conformance_registry": "difforge_sdk.testing.conformance",
    "hold_in_pipeline": "difforge_sdk.testing.conformance",
    "assert_light_entry_module": "difforge_sdk.testing.conformance",
    "AttentionConformance": "difforge_sdk.testing.kinds",
    "CacheConformance": "difforge_sdk.testing.kinds",
    "OffloadConformance": "difforge_sdk.testing.kinds",
    "SchedulerConformance": "difforge_sdk.testing.kinds",
}

__all__ = ["MARK", *_LAZY]

# assertion rewriting for the suites (they are imported later, on opt-in)
pytest.register_assert_rewrite("difforge_sdk.testing.conformance", "difforge_sdk.testing.kinds")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARK}: a check of the difforge-sdk conformance suite (difforge_sdk.testing)")


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'difforge_sdk.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from .conformance import ModelConformance, assert_light_entry_module, conformance_registry, hold_in_pipeline
    from .kinds import AttentionConformance, CacheConformance, OffloadConformance, SchedulerConformance
