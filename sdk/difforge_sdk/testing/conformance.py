"""The model conformance suite: what every ``ModelSpec`` must do, checked at a tiny size.

A model plugin's tests opt in with one class (the style of diffusers' model tester mixins)::

    from difforge_sdk.testing import ModelConformance

    class TestMyDiT(ModelConformance):
        model = "my-dit"                          # the ModelSpec name
        tiny_config = MyDiTConfig(hidden_size=32, depth=2)

        def forward_inputs(self, model):          # optional: enables the output checks
            return {"x": torch.randn(1, 16, 32), "t": torch.tensor([0.5])}

Every check runs against the registry of the installed plugins (plus ``plugins``: modules to
register that are not installed through an entry point), with a recording attention backend beside
them. The checks, one test each (parametrised by format and backend name):

- the plugin's entry module imports nothing heavy (checked in a fresh interpreter);
- the ModelSpec builds at the tiny config on the meta device, with no non-persistent buffers (models
  are built on meta and loaded with ``assign=True``), and on the CPU, with the same keys;
- ``config_from_shapes`` recovers the tiny config from the tiny state dict's shapes; the
  ``identifying_keys`` are present in it; the block layout names module lists that exist;
- no fingerprint in the registry maps to two models, and the fingerprints of ``released_configs``
  (recomputed on the meta device in every writable format) name the right variant;
- every checkpoint format of the model (its own, and every checkpoint ``ConverterSpec`` targeting it
  that has inverse maps) is written at tiny size, detected as this model in that format, and loaded
  by :func:`difforge.load_model` to identical weights;
- a random LoRA in every LoRA format of the model (``ConverterSpec(kind="lora")`` with inverse maps)
  loads strictly, fused and hot agree, and ``clear_lora`` restores every weight bit for bit;
- with ``forward_inputs``: the output is finite and deterministic; agrees with the ``math`` reference
  under every installed attention backend that supports the model's calls (``attention_atol``,
  ``attention_rtol``); is bit-identical under every location offload backend and within
  ``dtype_offload_tolerance`` (relative L2) under every dtype backend, applied to a
  :class:`difforge.Pipeline` holding the model as the runtime applies them, and bit-identical after
  their ``remove()``; and is bit-identical under every cache strategy at threshold 0 / interval 1.

Assertion messages name the spec, format, key or backend at fault and say what to fix.
``skip_checks = {"offload:disk": "why"}`` skips one check with a stated reason.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import difforge
from difforge import AttentionQuery, DifforgeError, ModelSpec, PipelineSpec, SlotSpec
from difforge._names import normalize_name, resolve
from difforge.loading.fingerprint import fingerprint_shapes
from difforge.ops.attention import use_attention
from difforge.plugins import PluginHost, PluginSettings
from difforge.runtime.options import merge_options

from .. import parity, tiny
from . import _probe

log = logging.getLogger(__name__)

__all__ = ["ModelConformance", "assert_light_entry_module", "conformance_registry", "hold_in_pipeline", "random_lora"]

MARK = "difforge_conformance"
_FIXTURE_PARAMS = ("checkpoint_format", "lora_format", "attention_backend", "offload_backend", "cache_strategy")


# ---------------------------------------------------------------- registries


@contextlib.contextmanager
def conformance_registry(plugins: Sequence[Any] = ()) -> Iterator[Any]:
    """The process-wide registry rebuilt from the installed plugins (honouring ``DIFFORGE_PLUGINS``),
    ``plugins`` and the recording attention backend; rebuilt from the environment afterwards."""
    host = difforge.reload_plugins(PluginSettings.from_env(), plugins=[_probe.PLUGIN, *plugins])
    try:
        yield host.registry
    finally:
        difforge.reload_plugins()


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block (restored after); None changes nothing."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=32)
def _collection_registry(plugins: tuple[Any, ...]) -> Any:
    """A private registry for parametrising at collection time (the process-wide one is left alone)."""
    return PluginHost(PluginSettings.from_env(), plugins=[_probe.PLUGIN, *plugins]).registry


def _params(name: str, registry: Any, model: str) -> list[Any]:
    try:
        spec = registry.models.get(model)
    except DifforgeError:
        return [pytest.param(None, id="unregistered")]
    if name == "checkpoint_format":
        out = []
        for fmt, conv in tiny.formats(spec, registry, writable_only=False).items():
            marks = ()
            if conv is not None and conv.inverse_rename is None:
                reason = (
                    f"converter {conv.name!r} ({fmt!r} -> {spec.name}) has no inverse_rename, so tiny files in its "
                    "format cannot be written; give it inverse_rename (and inverse_transform) to have it tested"
                )
                marks = (pytest.mark.skip(reason=reason),)
            out.append(pytest.param(fmt, id=fmt, marks=marks))
        return out
    if name == "lora_format":
        out = []
        for conv in _lora_converters(registry, spec.name):
            marks = ()
            if conv.inverse_rename is None:
                reason = f"LoRA converter {conv.name!r} has no inverse_rename, so LoRA files in its format cannot be written to test it"
                marks = (pytest.mark.skip(reason=reason),)
            out.append(pytest.param(conv.source_format, id=conv.source_format, marks=marks))
        return out or [pytest.param(None, id="no-lora-converter")]
    table = {"attention_backend": registry.attention, "offload_backend": registry.offload, "cache_strategy": registry.caches}[name]
    names = [s.name for s in table if normalize_name(s.name) != _probe.NAME]
    return [pytest.param(n, id=n) for n in names] or [pytest.param(None, id="none-installed")]


def _lora_converters(registry: Any, model: str) -> list[Any]:
    """The LoRA converters targeting ``model``, one per source format."""
    out: dict[str, Any] = {}
    for conv in registry.converters:
        if conv.kind == "lora" and normalize_name(conv.target_model) == normalize_name(model):
            out.setdefault(normalize_name(conv.source_format), conv)
    return list(out.values())


def random_lora(module: nn.Module, converter: Any, *, seed: int = 0, rank: int = 2) -> dict[str, torch.Tensor]:
    """A random LoRA (rank ``rank``) on every linear layer of ``module`` that ``converter``'s format can
    express, in that format (own-layout groups through ``from_own``)."""
    from difforge.errors import ConversionError
    from difforge.lora.formats import from_own

    g = torch.Generator().manual_seed(seed)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        n, k = layer.weight.shape
        group = {"A": torch.randn(rank, k, generator=g) / k**0.5, "B": torch.randn(n, rank, generator=g) * 0.2,
                 "alpha": torch.tensor(float(rank))}
        try:
            from_own({name: group}, converter)
        except ConversionError:
            continue  # a layer the format has no name for
        groups[name] = group
    return from_own(groups, converter) if groups else {}


# ---------------------------------------------------------------- helpers


def _run(model: nn.Module, call: Any, inputs: Mapping[str, Any], attention: str) -> Any:
    with torch.no_grad(), use_attention(attention):
        return call(model, dict(inputs))


def _detached(output: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in parity.flatten(output).items()}


def _first_difference(got: Any, want: Mapping[str, torch.Tensor]) -> str | None:
    """None when ``got`` is bit-identical to ``want`` (flattened), else what differs."""
    ours = parity.flatten(got)
    if ours.keys() != want.keys():
        return f"outputs {sorted(ours)} instead of {sorted(want)}"
    for path, ref in want.items():
        out = ours[path]
        if out.shape != ref.shape or out.dtype != ref.dtype:
            return f"{path}: {out.dtype} {list(out.shape)} instead of {ref.dtype} {list(ref.shape)}"
        if not torch.equal(out, ref):
            return f"{path}: max abs diff {(out.double() - ref.double()).abs().max().item():.3g} (must be 0)"
    return None


def _rel_l2(got: Any, want: Mapping[str, torch.Tensor]) -> float:
    ours = parity.flatten(got)
    num = sum(float((ours[k].double() - v.double()).norm()) ** 2 for k, v in want.items())
    den = sum(float(v.double().norm()) ** 2 for v in want.values())
    return (num / den) ** 0.5 if den else float(num > 0) * float("inf")


def _config_diff(got: Any, want: Any) -> str:
    if dataclasses.is_dataclass(got) and dataclasses.is_dataclass(want) and type(got) is type(want):
        fields = [f.name for f in dataclasses.fields(want) if getattr(got, f.name) != getattr(want, f.name)]
        return ", ".join(f"{f}={getattr(got, f)!r} (tiny config: {getattr(want, f)!r})" for f in fields)
    return f"{got!r} instead of {want!r}"


@functools.lru_cache(maxsize=256)
def _key_pattern(pattern: str) -> re.Pattern[str]:
    """``blocks.*.attn.qkv.weight``: ``*`` matches one or more dotted name parts (as detection does)."""
    return re.compile(r"\.".join(r"[^.]+(?:\.[^.]+)*" if p == "*" else re.escape(p) for p in pattern.split(".")))


def _or_fail(make: Any, what: str) -> Any:
    """``make()``, or a test failure saying ``what: <the DifforgeError's message>`` (no traceback chain)."""
    try:
        return make()
    except DifforgeError as exc:
        message = f"{what}: {exc}"
    pytest.fail(message, pytrace=False)


HEAVY_MODULES = frozenset({"torch", "triton", "transformers", "diffusers"})


@functools.lru_cache(maxsize=None)
def _heavy_imports(module: str) -> tuple[str, ...]:
    """The heavy top-level packages importing ``module`` pulls in (in a fresh interpreter)."""
    code = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY_MODULES)!r})))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode:
        raise AssertionError(f"importing the entry module {module} failed: {done.stderr.strip()[-2000:]}")
    return tuple(done.stdout.split())


def assert_light_entry_module(table: Any, name: str) -> None:
    """The entry module of the plugin that registered ``name`` in ``table`` imports nothing heavy
    (skips for difforge's built-in plugin and for plugins that are objects, not modules)."""
    entry = table.provider(name)
    record = difforge.get_plugin_host().records.get(normalize_name(entry.plugin))
    module = getattr(record, "module", None)
    if record is not None and record.source == "builtin":
        pytest.skip(f"{name} is built into difforge")
    if not module or not re.fullmatch(r"[A-Za-z_][\w.]*", module):
        pytest.skip(f"{name} is registered by a plugin object, not an importable module")
    heavy = _heavy_imports(module)
    assert not heavy, (
        f"importing {module} (the entry module of plugin {entry.plugin!r}, which registers {name}) imports {', '.join(heavy)}. "
        "Discovery imports every entry module: name torch modules and kernels by lazy 'package.module:attribute' strings."
    )


def _few(items: Sequence[str], n: int = 6) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _describe(q: AttentionQuery) -> str:
    return (f"{q.device_type} {str(q.dtype).removeprefix('torch.')}, head dim {q.head_dim}, {q.heads}/{q.kv_heads} heads, "
            f"q_len {q.q_len}, kv_len {q.kv_len}, mask {q.mask_shape if q.has_mask else None}")


def _meta_state_shapes(spec: ModelSpec, config: Any) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        module = spec.build(config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _format_shapes(spec: ModelSpec, config: Any, converter: Any) -> dict[str, tuple[int, ...]]:
    """The key names and shapes of ``spec`` at ``config`` in a converter's format, on meta tensors."""
    from difforge.loading import convert

    with torch.device("meta"):
        module = spec.build(config)
    mode = getattr(convert, "_meta_ops_mode", None)  # cat/stack of meta tensors from shapes (no torch._dynamo import)
    with mode() if mode is not None else contextlib.nullcontext():
        tensors = tiny.to_format(module.state_dict(), converter)
    return {k: tuple(v.shape) for k, v in tensors.items()}


def hold_in_pipeline(spec: ModelSpec, module: nn.Module, *, device: Any = "cpu", torch_dtype: torch.dtype = torch.float32) -> difforge.Pipeline:
    """A :class:`difforge.Pipeline` whose one component (slot = the model's role) is ``module``: what
    offload backends are applied to (``OffloadSpec.apply(pipeline, options)``), as the runtime does."""
    slot = normalize_name(spec.role).replace("-", "_")
    pipe_spec = PipelineSpec(
        name=f"conformance-{spec.name}", family=spec.family, slots=(SlotSpec(slot, (spec.name,)),),
        pipeline="difforge.runtime.pipeline:Pipeline", component_order=(slot,),
    )
    detection = getattr(module, "difforge_detection", None)
    return difforge.Pipeline(pipe_spec, {slot: module}, device=device, torch_dtype=torch_dtype, detections={slot: detection})


# ---------------------------------------------------------------- what the checks share


class Subject:
    """The model under test and what the checks share, each made on first use (one per test class)."""

    def __init__(self, suite: ModelConformance, folder: Path) -> None:
        self.suite = suite
        self.folder = folder
        self._cache: dict[str, Any] = {}

    def _once(self, name: str, make: Any) -> Any:
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    @property
    def spec(self) -> ModelSpec:
        model = self.suite.model
        try:
            return difforge.get_registry().models.get(model)
        except DifforgeError as exc:
            pytest.fail(
                f"ModelSpec {model!r} is not registered: {exc}\nInstall the plugin that provides it (pip install -e .), "
                f"or list its entry module in the test class: plugins = [my_plugin]", pytrace=False,
            )

    @property
    def config(self) -> Any:
        return self.suite.tiny_config

    @property
    def module(self) -> nn.Module:
        """The tiny model with seeded random weights (:func:`difforge_sdk.tiny.random_model`)."""
        return self._once("module", lambda: tiny.random_model(self.spec, self.config, seed=self.suite.seed, device=self.suite.device))

    @property
    def own_file(self) -> Path:
        return self._once("own_file", lambda: tiny.write_checkpoint(self.spec, self.folder / "own", module=self.module))

    @property
    def inputs(self) -> dict[str, Any]:
        def make() -> dict[str, Any] | None:
            torch.manual_seed(self.suite.seed)
            inputs = self.suite.forward_inputs(self.module)
            if inputs is None:
                return None
            return {k: v.to(self.suite.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

        inputs = self._once("inputs", make)
        if inputs is None:
            pytest.skip(f"{type(self.suite).__name__} defines no forward_inputs(model): the output checks need inputs for the model")
        return inputs

    @property
    def reference(self) -> tuple[dict[str, torch.Tensor], list[AttentionQuery]]:
        """The output under the ``math`` reference attention, and the attention calls the model made."""

        def make() -> tuple[dict[str, torch.Tensor], list[AttentionQuery]]:
            with _probe.recording() as queries:
                out = _run(self.module, self.suite.call, self.inputs, _probe.NAME)
            return _detached(out), list(queries)

        return self._once("reference", make)

    def maybe_inputs(self) -> dict[str, Any] | None:
        """The inputs, or None when the test class defines no ``forward_inputs``."""
        try:
            return self.inputs
        except pytest.skip.Exception:
            return None

    def fresh_loaded(self) -> nn.Module:
        """The tiny model loaded from its own-format file by :func:`difforge.load_model` (fp32)."""
        return difforge.load_model(self.own_file, torch_dtype=torch.float32, device=self.suite.device)


# ---------------------------------------------------------------- the suite


class ModelConformance:
    """Subclass as ``TestSomething(ModelConformance)`` with ``model`` and ``tiny_config`` set.

    Optional: ``forward_inputs(model) -> dict`` (enables the output checks), ``call(model, inputs)``
    (default: ``getattr(model, method)(**inputs)``), ``method`` (``"forward"``, or ``"decode"`` for
    a VAE), ``plugins``, the tolerances, ``skip_checks``.
    """

    pytestmark = [getattr(pytest.mark, MARK)]

    model: ClassVar[str]
    """The ModelSpec name."""
    tiny_config: ClassVar[Any]
    """A config small enough to run in milliseconds, whose fields ``config_from_shapes`` can all recover."""
    plugins: ClassVar[Sequence[Any]] = ()
    """Plugin modules to register besides the installed ones (a plugin not installed through an entry point)."""
    method: ClassVar[str] = "forward"
    device: ClassVar[str] = "cpu"
    seed: ClassVar[int] = 0
    steps: ClassVar[int] = 3
    """Forward calls under a cache strategy (the cache sees that many steps)."""
    attention_atol: ClassVar[float] = 1e-4
    attention_rtol: ClassVar[float] = 1e-5
    """An attention backend agrees with the reference when max |diff| <= atol + rtol * max |reference|."""
    dtype_offload_tolerance: ClassVar[float] = 0.1
    """Relative L2 error of the output allowed under a dtype offload backend. fp8 (e4m3) rounds every
    weight with about 3.6% RMS relative error, which a few layers of a tiny random model compound to
    5-10%; a broken cast is off by 100%. Deep or gated models may state a larger one."""
    threads: ClassVar[int | None] = 1
    """torch intra-op threads during the suite: tiny models only lose by more (None: leave as is)."""
    skip_checks: ClassVar[Mapping[str, str]] = {}
    """``{"attention:triton": "reason", "offload:disk": ..., "cache:deepcache": ..., "format:comfyui": ...}``"""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if isinstance(getattr(cls, "model", None), str) and hasattr(cls, "tiny_config"):
            tiny.register_tiny(cls.model, cls.tiny_config)

    # -- what a plugin's test class may override

    def forward_inputs(self, model: nn.Module) -> dict[str, Any] | None:
        """Keyword arguments of one call of ``model`` (small tensors); None skips the output checks."""
        return None

    def call(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        """Run the model (tensors, tuples, NamedTuples or dicts of tensors come back)."""
        return getattr(model, self.method)(**inputs)

    # -- pytest plumbing

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        for name in _FIXTURE_PARAMS:
            if name in metafunc.fixturenames:
                registry = _collection_registry(tuple(type(self).plugins))
                metafunc.parametrize(name, _params(name, registry, type(self).model))

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _difforge_conformance_registry(cls) -> Iterator[Any]:
        with conformance_registry(cls.plugins), torch_threads(cls.threads):
            yield difforge.get_plugin_host()

    @pytest.fixture(autouse=True)
    def _difforge_conformance_host(self, _difforge_conformance_registry: Any) -> Iterator[None]:
        """Rebuild the suite's registry when something (a conftest fixture) replaced it since."""
        if difforge.get_plugin_host() is _difforge_conformance_registry:
            yield
            return
        with conformance_registry(type(self).plugins):
            yield

    @pytest.fixture(scope="class")
    @classmethod
    def subject(cls, tmp_path_factory: pytest.TempPathFactory) -> Subject:
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", cls.model)
        return Subject(cls(), tmp_path_factory.mktemp(f"conformance-{name}"))

    def _skip_if(self, check: str, name: str) -> None:
        reason = self.skip_checks.get(f"{check}:{name}") or self.skip_checks.get(f"{check}:{normalize_name(name)}")
        if reason:
            pytest.skip(f"skip_checks[{check}:{name}]: {reason}")

    # -- construction

    def test_builds_on_meta(self, subject: Subject) -> None:
        spec, config = subject.spec, subject.config
        with torch.device("meta"):
            module = spec.build(config)
        assert isinstance(module, nn.Module), f"{spec.name}: ModelSpec.module({config!r}) returned a {type(module).__name__}, not a torch.nn.Module"
        state = module.state_dict()
        assert state, f"{spec.name}: the model built at the tiny config has no weights"
        real = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if not t.is_meta]
        assert not real, (
            f"{spec.name}: built under torch.device('meta'), the model still made real tensors: {_few(real)}. "
            "Create tensors without an explicit device in __init__ (models are built on meta, then loaded with assign=True)."
        )
        transient = [n for n, _ in module.named_buffers() if n not in state]
        assert not transient, (
            f"{spec.name}: __init__ registers non-persistent buffers ({_few(transient)}). difforge builds models on the "
            "meta device and assigns the checkpoint's tensors, so these would stay on meta: compute them in forward, "
            "or cache them lazily per device and dtype."
        )

    def test_builds_on_cpu(self, subject: Subject) -> None:
        spec = subject.spec
        cpu = {k: tuple(v.shape) for k, v in subject.module.state_dict().items()}
        meta = _meta_state_shapes(spec, subject.config)
        assert cpu == meta, (
            f"{spec.name}: the model built on the CPU and on the meta device differ: "
            f"{_few([k for k in {*cpu, *meta} if cpu.get(k) != meta.get(k)])}. Construction must not depend on the device."
        )

    def test_config_from_shapes(self, subject: Subject) -> None:
        spec, config = subject.spec, subject.config
        assert dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen, (  # type: ignore[attr-defined]
            f"{spec.name}: the tiny config is a {type(config).__name__}; model configs are frozen dataclasses "
            "(@dataclass(frozen=True)), so that detection results compare and hash"
        )
        shapes = {k: tuple(v.shape) for k, v in subject.module.state_dict().items()}
        inferred = spec.infer_config(shapes)
        assert inferred is not None, (
            f"{spec.name}: config_from_shapes returned None for the tiny model's own state dict ({len(shapes)} keys, e.g. "
            f"{_few(sorted(shapes), 4)}). It must accept every state dict of this model in its own format {spec.format!r}."
        )
        assert inferred == config, (
            f"{spec.name}: config_from_shapes recovered {_config_diff(inferred, config)}. Infer these fields from the "
            "shapes, or, if they cannot be read from weights, keep their defaults in the tiny config."
        )

    def test_entry_module_is_light(self, subject: Subject) -> None:
        assert_light_entry_module(difforge.get_registry().models, subject.spec.name)

    def test_identifying_keys(self, subject: Subject) -> None:
        spec = subject.spec
        assert spec.identifying_keys, (
            f"{spec.name}: ModelSpec.identifying_keys is empty, so structural detection never considers this model in its "
            "own format; list a few own-layout keys that mark it ('blocks.*.attn.qkv.weight': * matches block indices)"
        )
        keys = list(subject.module.state_dict())
        missing = [p for p in spec.identifying_keys if not any(_key_pattern(p).fullmatch(k) for k in keys)]
        assert not missing, (
            f"{spec.name}: identifying_keys {missing} match no key of the tiny model's state dict (e.g. {_few(sorted(keys), 4)}); "
            "they must be own-layout keys every checkpoint of the model has"
        )

    def test_block_layout(self, subject: Subject) -> None:
        spec, module = subject.spec, subject.module
        if spec.layout is None:
            pytest.skip(f"{spec.name} declares no block layout (ModelSpec.layout): caches and block offload treat it as one unit")
        for group in spec.layout.groups:
            try:
                blocks = module.get_submodule(group.path)
            except AttributeError:
                pytest.fail(f"{spec.name}: ModelSpec.layout names {group.path!r}, which the model does not have", pytrace=False)
            assert isinstance(blocks, nn.ModuleList) and len(blocks), (
                f"{spec.name}: layout path {group.path!r} is a {type(blocks).__name__} with {len(blocks) if hasattr(blocks, '__len__') else '?'} "
                "entries; it must be a non-empty nn.ModuleList of blocks (make the tiny config have at least one)"
            )

    # -- fingerprints

    def test_fingerprints_unique(self, subject: Subject) -> None:
        registry = difforge.get_registry()
        owners: dict[str, dict[str, str]] = {}
        for model in registry.models:
            for fp, variant in model.fingerprints.items():
                owners.setdefault(fp, {})[model.name] = variant
        clashes = {fp: names for fp, names in owners.items() if len(names) > 1}
        assert not clashes, "fingerprints registered by more than one model (detection cannot tell them apart): " + "; ".join(
            f"{fp}: " + ", ".join(f"{m} ({v}, plugin {registry.models.provider(m).distribution or registry.models.provider(m).plugin})" for m, v in names.items())
            for fp, names in clashes.items()
        )
        bad = [fp for fp in subject.spec.fingerprints if not re.fullmatch(r"[0-9a-f]{32}", fp)]
        assert not bad, f"{subject.spec.name}: fingerprints {bad} are not difforge.fingerprint() values (32 lowercase hex digits)"

    def test_released_configs(self, subject: Subject) -> None:
        spec = subject.spec
        if not spec.released_configs:
            pytest.skip(f"{spec.name} declares no released_configs")
        registry = difforge.get_registry()
        writable = tiny.formats(spec, registry)
        unwritable = set(tiny.formats(spec, registry, writable_only=False)) - set(writable)
        for variant, ref in spec.released_configs.items():
            config = resolve(ref)
            shapes = _meta_state_shapes(spec, config)
            inferred = spec.infer_config(shapes)
            assert inferred == config, (
                f"{spec.name}: released config {variant!r} built on the meta device is inferred back as "
                f"{_config_diff(inferred, config) if inferred is not None else None}: config_from_shapes must recover released models"
            )
            computed = {}
            for fmt, conv in writable.items():
                computed[fingerprint_shapes(_format_shapes(spec, config, conv))] = fmt
            wrong = {fp: (fmt, spec.fingerprints[fp]) for fp, fmt in computed.items() if spec.fingerprints.get(fp, variant) != variant}
            assert not wrong, f"{spec.name}: the {variant!r} release recomputed in these formats has fingerprints registered for other variants: {wrong}"
            registered = {fp for fp, v in spec.fingerprints.items() if v == variant}
            if registered and not registered & computed.keys() and not unwritable:
                pytest.fail(
                    f"{spec.name}: none of the fingerprints registered for {variant!r} ({sorted(registered)}) is the fingerprint of "
                    f"the released config in a format difforge can write ({', '.join(f'{f}: {fmt}' for f, fmt in computed.items())}). "
                    "Recompute them with difforge.fingerprint() on the released config built on the meta device.",
                    pytrace=False,
                )

    # -- checkpoint formats

    def test_checkpoint_format(self, subject: Subject, checkpoint_format: str | None) -> None:
        spec = subject.spec
        self._skip_if("format", checkpoint_format or "")
        conv = tiny.formats(spec)[checkpoint_format]
        how = f"inverse_transform + inverse_rename of converter {conv.name!r}" if conv else "its own layout"
        path = tiny.write_checkpoint(spec, subject.folder / f"format-{normalize_name(checkpoint_format)}", format=checkpoint_format, module=subject.module)
        det = _or_fail(lambda: difforge.detect(path), f"{spec.name}: a tiny checkpoint in format {checkpoint_format!r} ({how}) is not detected")
        assert det.model == spec.name, f"{spec.name}: a tiny checkpoint in format {checkpoint_format!r} ({how}) is detected as model {det.model!r}"
        assert normalize_name(det.format) == normalize_name(checkpoint_format), (
            f"{spec.name}: a tiny checkpoint in format {checkpoint_format!r} ({how}) is detected as format {det.format!r}"
            + (f" (through converter {det.converter!r})" if det.converter else "")
            + ": the converter's detect() must accept its own source format (and only that)"
        )
        assert det.config == subject.config, (
            f"{spec.name}: a tiny checkpoint in format {checkpoint_format!r} is detected with config {_config_diff(det.config, subject.config)}"
        )
        loaded = _or_fail(lambda: difforge.load_model(path), f"{spec.name}: the tiny checkpoint in format {checkpoint_format!r} ({how}) does not load")
        want, got = subject.module.state_dict(), loaded.state_dict()
        assert got.keys() == want.keys(), f"{spec.name}: format {checkpoint_format!r} loads keys {_few(sorted(got.keys() ^ want.keys()))} differently"
        differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k].cpu(), want[k].cpu())]
        assert not differ, (
            f"{spec.name}: format {checkpoint_format!r} ({how}) loads {len(differ)} tensors with other values: {_few(differ)}. "
            "The converter's transform and inverse_transform (and rename / inverse_rename) must undo each other exactly."
        )

    def test_lora_format(self, subject: Subject, lora_format: str | None, tmp_path: Path) -> None:
        """A random LoRA written in the format loads (strict), changes the weights when fused and
        the output, agrees hot and fused, and ``clear_lora`` restores every weight bit for bit."""
        spec = subject.spec
        if lora_format is None:
            pytest.skip(f"{spec.name} has no LoRA converter (ConverterSpec(kind='lora'))")
        self._skip_if("lora", lora_format)
        from difforge.lora.formats import save_lora

        conv = {normalize_name(c.source_format): c for c in _lora_converters(difforge.get_registry(), spec.name)}[normalize_name(lora_format)]
        module = subject.fresh_loaded()
        tensors = random_lora(module, conv, seed=self.seed)
        assert tensors, f"LoRA format {lora_format!r} ({conv.name}) cannot express a LoRA on any linear layer of {spec.name}"
        path = save_lora(tensors, tmp_path / f"lora.{normalize_name(lora_format)}.safetensors", lora_format)
        pipe = hold_in_pipeline(spec, module)
        slot = next(iter(pipe.components))
        before = {k: v.clone() for k, v in module.state_dict().items()}
        what = f"{spec.name}: a random LoRA in format {lora_format!r} ({conv.name}, {len(tensors)} tensors)"
        _or_fail(lambda: pipe.load_lora(str(path), fuse=True, target=slot), f"{what} does not load")
        changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
        assert changed, f"{what}: fusing it changed no weight; the converter maps its keys to no module"
        inputs = subject.maybe_inputs()
        fused = _run(module, self.call, inputs, "math") if inputs is not None else None
        pipe.clear_lora()
        restored = [k for k, v in module.state_dict().items() if v.dtype != before[k].dtype or not torch.equal(v, before[k])]
        assert not restored, f"{what}: after clear_lora() these weights differ from before: {_few(restored)}"
        if inputs is None:
            return
        ref, _ = subject.reference
        assert _first_difference(fused, ref) is not None, f"{what}: the fused LoRA does not change the output"
        _or_fail(lambda: pipe.load_lora(str(path), fuse=False, target=slot), f"{what} does not load as hot LoRA")
        hot = _run(module, self.call, inputs, "math")
        pipe.clear_lora()
        report = parity.compare(_detached(hot), _detached(fused), atol=self.attention_atol, rtol=self.attention_rtol, name=f"{what}: hot vs fused")
        assert report.ok, str(report)
        diff = _first_difference(_run(module, self.call, inputs, "math"), ref)
        assert diff is None, f"{what}: after clear_lora() the output differs: {diff}"

    # -- outputs

    def test_forward_is_finite_and_deterministic(self, subject: Subject) -> None:
        ref, _ = subject.reference
        nonfinite = [p for p, t in ref.items() if t.is_floating_point() and not bool(t.isfinite().all())]
        assert not nonfinite, f"{subject.spec.name}: non-finite values in {nonfinite} at the tiny config (forward_inputs too large?)"
        again = _run(subject.module, self.call, subject.inputs, _probe.NAME)
        diff = _first_difference(again, ref)
        assert diff is None, f"{subject.spec.name}: two calls with the same inputs differ: {diff}. A forward must not keep state between calls."

    def test_attention_backend(self, subject: Subject, attention_backend: str | None) -> None:
        if attention_backend is None:
            pytest.skip("no attention backend is installed")
        self._skip_if("attention", attention_backend)
        ref, queries = subject.reference
        name = subject.spec.name
        if not queries:
            pytest.skip(f"{name} makes no difforge.ops.attention calls (if it has attention layers, route them through it)")
        backend = difforge.get_registry().attention.get(attention_backend)
        supports = resolve(backend.supports)
        unsupported = {_describe(q): answer for q in queries if (answer := supports(q)) is not True}
        if unsupported:
            pytest.skip(f"attention backend {attention_backend!r} does not support {name}'s calls: " + "; ".join(f"{q}: {a}" for q, a in unsupported.items()))
        out = _run(subject.module, self.call, subject.inputs, attention_backend)
        report = parity.compare(_detached(out), ref, atol=self.attention_atol, rtol=self.attention_rtol, name=f"{name} with attention={attention_backend!r} vs math")
        assert report.ok, f"{report}\nThe backend and the model must agree within attention_atol/attention_rtol on every call it supports."

    def test_offload_backend(self, subject: Subject, offload_backend: str | None, tmp_path: Path) -> None:
        if offload_backend is None:
            pytest.skip("no offload backend is installed")
        self._skip_if("offload", offload_backend)
        ref, _ = subject.reference
        spec = subject.spec
        backend = difforge.get_registry().offload.get(offload_backend)
        module = subject.fresh_loaded()
        pipe = hold_in_pipeline(spec, module, device=self.device, torch_dtype=torch.float32)
        options = merge_options("offload backend", backend.name, backend.options, {})
        if "offload_dir" in options:
            options["offload_dir"] = str(tmp_path)
        handle = resolve(backend.apply)(pipe, options)
        removed = False
        try:
            out = _run(module, self.call, subject.inputs, "math")
            again = _run(module, self.call, subject.inputs, "math")
            handle.remove()
            removed = True
        finally:
            if not removed:
                handle.remove()
        what = f"{spec.name} under offload backend {backend.name!r} ({backend.kind})"
        if backend.kind == "location":
            diff = _first_difference(out, ref)
            assert diff is None, f"{what}: {diff}. A location backend moves tensors, it must not change a single bit."
        else:
            err = _rel_l2(out, ref)
            assert err <= self.dtype_offload_tolerance, (
                f"{what}: relative L2 error {err:.3g} > dtype_offload_tolerance {self.dtype_offload_tolerance:g}. "
                "Keep sensitive weights in high precision (ModelSpec.keep_high_precision) or state a tolerance for this model."
            )
        diff = _first_difference(again, _detached(out))
        assert diff is None, f"{what}: a second call differs from the first: {diff}"
        diff = _first_difference(_run(module, self.call, subject.inputs, "math"), ref)
        assert diff is None, f"{what}: after handle.remove() the output differs from before: {diff}. remove() must restore every tensor."
        want = subject.module.state_dict()
        changed = [k for k, v in module.state_dict().items() if v.dtype != want[k].dtype or not torch.equal(v.cpu(), want[k].cpu())]
        assert not changed, f"{what}: after handle.remove() these tensors differ from the checkpoint's: {_few(changed)}"

    def test_cache_strategy(self, subject: Subject, cache_strategy: str | None) -> None:
        if cache_strategy is None:
            pytest.skip("no cache strategy is installed")
        self._skip_if("cache", cache_strategy)
        spec = subject.spec
        if spec.layout is None:
            pytest.skip(f"{spec.name} declares no block layout: cache strategies do not apply to it")
        ref, _ = subject.reference
        cache = difforge.get_registry().caches.get(cache_strategy)
        exact = {k: (0.0 if "threshold" in k else 1) for k in cache.options if "threshold" in k or "interval" in k}
        if not exact:
            pytest.skip(f"cache strategy {cache.name!r} has no threshold or interval option to make it compute every step")
        options = {**merge_options("cache strategy", cache.name, cache.options, exact), "family": spec.family}
        module = copy.deepcopy(subject.module)  # the shared one stays untouched whatever the cache does
        keys = list(module.state_dict())
        handle = resolve(cache.apply)(module, spec.layout, options)
        try:
            handle.reset()
            outs = [_run(module, self.call, subject.inputs, "math") for _ in range(self.steps)]
            stats = handle.stats()
        finally:
            handle.remove()
        what = f"{spec.name} under cache strategy {cache.name!r} with {exact}"
        for step, out in enumerate(outs):
            diff = _first_difference(out, ref)
            assert diff is None, f"{what}, step {step}: {diff}. At threshold 0 / interval 1 every block must be computed, bit for bit."
        assert list(module.state_dict()) == keys, f"{what}: remove() left the state dict keys changed"
        diff = _first_difference(_run(module, self.call, subject.inputs, "math"), ref)
        assert diff is None, f"{what}: after remove() the output differs: {diff}"
        log.debug("%s: stats %s", what, stats)
