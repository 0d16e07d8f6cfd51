"""Conformance suites of the plugin kinds that are not models: attention backends, cache strategies,
offload backends and schedulers. Each runs its plugin on the SDK's toy family, through the same
calls the runtime makes (``difforge.ops.attention``, ``CacheSpec.apply``, ``OffloadSpec.apply`` on a
pipeline, ``build_scheduler``) and through a whole toy pipeline::

    from difforge_sdk.testing import CacheConformance

    class TestMyCache(CacheConformance):
        cache = "mycache"                   # the registered name
        options = {"cache_interval": 3}     # a setting that really caches (the default: the spec's defaults)

The toy family is registered beside the installed plugins for these tests; ``plugins`` adds
modules that are not installed through an entry point.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import difforge
import difforge_sdk.toy
from difforge import ConfigError, DifforgeError
from difforge._names import resolve
from difforge.builtin.attention import math_attention
from difforge.ops.attention import make_query
from difforge.runtime.options import merge_options
from difforge.schedulers import Scheduler, build_scheduler

from .. import parity, tiny
from .conformance import MARK, _first_difference, _rel_l2, assert_light_entry_module, conformance_registry, torch_threads

__all__ = ["AttentionConformance", "CacheConformance", "OffloadConformance", "SchedulerConformance"]

CALL = {"prompt": "a red cube", "seed": 3, "num_inference_steps": 3, "output_type": "latent", "progress_bar_cmd": lambda x: x}


class _ToySuite:
    """Registry (installed plugins + the toy family + ``plugins``) and toy checkpoints, per test class."""

    pytestmark = [getattr(pytest.mark, MARK)]
    plugins: ClassVar[Sequence[Any]] = ()
    threads: ClassVar[int | None] = 1
    """torch intra-op threads during the suite (None: leave as is)."""

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _difforge_kind_registry(cls) -> Iterator[Any]:
        with conformance_registry([difforge_sdk.toy, *cls.plugins]), torch_threads(cls.threads):
            yield difforge.get_plugin_host()

    @pytest.fixture(autouse=True)
    def _difforge_kind_host(self, _difforge_kind_registry: Any) -> Iterator[None]:
        if difforge.get_plugin_host() is _difforge_kind_registry:
            yield
            return
        with conformance_registry([difforge_sdk.toy, *type(self).plugins]):
            yield

    @pytest.fixture(scope="class")
    @classmethod
    def toy_files(cls, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
        from difforge_sdk.toy.checkpoints import write_toy_checkpoints
        from difforge_sdk.toy.models import ToyDiTConfig

        files = write_toy_checkpoints(tmp_path_factory.mktemp("toy"), dit_config=ToyDiTConfig(depth=4))
        return list(files.values())

    @staticmethod
    def pipeline(files: list[Path], **options: Any) -> difforge.Pipeline:
        return difforge.Pipeline.from_pretrained("toy", [str(f) for f in files], device="cpu", **options)


# ---------------------------------------------------------------- attention

_ATTENTION_CASES: dict[str, dict[str, Any]] = {
    "self": dict(b=2, h=4, kvh=4, nq=37, nk=37, d=64),
    "cross": dict(b=2, h=4, kvh=4, nq=16, nk=29, d=64),
    "head-dim-128": dict(b=1, h=2, kvh=2, nq=33, nk=33, d=128),
    "grouped-query": dict(b=2, h=8, kvh=2, nq=21, nk=21, d=64),
    "key-padding-mask": dict(b=2, h=4, kvh=4, nq=19, nk=19, d=64, mask="keys"),
    "full-mask": dict(b=2, h=4, kvh=4, nq=17, nk=23, d=64, mask="full"),
    "causal-mask": dict(b=1, h=2, kvh=2, nq=24, nk=24, d=64, mask="causal"),
    "scale": dict(b=1, h=2, kvh=2, nq=12, nk=12, d=64, scale=0.3),
}


def _attention_inputs(case: Mapping[str, Any], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    b, h, kvh, nq, nk, d = (case[k] for k in ("b", "h", "kvh", "nq", "nk", "d"))
    q, k, v = (torch.randn(shape, generator=g).to(dtype) for shape in ((b, h, nq, d), (b, kvh, nk, d), (b, kvh, nk, d)))
    mask = None
    if case.get("mask") == "keys":
        mask = (torch.arange(nk) < torch.tensor([nk, nk // 2])[:, None])[:, None, None, :]
    elif case.get("mask") == "full":
        mask = torch.rand(b, h, nq, nk, generator=g) > 0.3
        mask[..., 0] = True  # every query sees something
    elif case.get("mask") == "causal":
        mask = torch.ones(nq, nk, dtype=torch.bool).tril()[None, None]
    return q, k, v, mask


class AttentionConformance(_ToySuite):
    """An attention backend: ``supports`` answers True or a reason; where it says True, the output
    agrees with the ``math`` reference (masks, grouped-query heads, cross attention, ``scale``) in
    the input dtype and shape; a toy pipeline run with it agrees with the same run under ``math``."""

    backend: ClassVar[str]
    dtypes: ClassVar[Sequence[torch.dtype]] = (torch.float32, torch.bfloat16)
    tolerances: ClassVar[Mapping[torch.dtype, float]] = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
    """max abs diff allowed per dtype (unit-variance inputs)."""
    device: ClassVar[str] = "cpu"

    def test_entry_module_is_light(self) -> None:
        assert_light_entry_module(difforge.get_registry().attention, self.backend)

    def test_registered(self) -> None:
        spec = difforge.get_registry().attention.get(self.backend)
        assert isinstance(spec.priority, int), f"attention backend {self.backend!r}: priority must be an int, got {spec.priority!r}"
        resolve(spec.fn), resolve(spec.supports)  # the lazy references resolve

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if metafunc.function.__name__ == "test_matches_math":
            metafunc.parametrize("dtype", [str(d).removeprefix("torch.") for d in type(self).dtypes])
            metafunc.parametrize("case", list(_ATTENTION_CASES))

    def test_matches_math(self, case: str, dtype: str) -> None:
        torch_dtype = getattr(torch, dtype)
        q, k, v, mask = (t.to(self.device) if t is not None else None for t in _attention_inputs(_ATTENTION_CASES[case], torch_dtype))
        spec = difforge.get_registry().attention.get(self.backend)
        answer = resolve(spec.supports)(make_query(q, k, v, mask))
        assert answer is True or (isinstance(answer, str) and answer), (
            f"attention backend {self.backend!r}: supports() must return True or a non-empty reason string, got {answer!r}"
        )
        if answer is not True:
            pytest.skip(f"{self.backend} does not support this call: {answer}")
        scale = _ATTENTION_CASES[case].get("scale")
        out = difforge.ops.attention(q, k, v, mask=mask, scale=scale, backend=self.backend)
        assert out.shape == q.shape and out.dtype == q.dtype, (
            f"attention backend {self.backend!r} returned {out.dtype} {list(out.shape)} for q {q.dtype} {list(q.shape)}: "
            "it must return [B, H, Nq, D] in the input dtype"
        )
        ref = math_attention(q, k, v, mask=mask, scale=scale)
        parity.assert_close(out, ref, atol=self.tolerances[torch_dtype], name=f"attention {self.backend!r} ({case}, {dtype}) vs math")

    def test_toy_pipeline(self, toy_files: list[Path]) -> None:
        pipe = self.pipeline(toy_files)
        pipe.set_attention("math")
        ref = pipe(**CALL)
        pipe.set_attention(self.backend)
        try:
            out = pipe(**CALL)
        except ConfigError as exc:
            if "cannot serve this call" not in str(exc):
                raise
            pytest.skip(f"{self.backend} does not support the toy DiT's calls: {exc}")
        parity.assert_close(out, ref, atol=1e-3, name=f"toy pipeline with attention={self.backend!r} vs math")


# ---------------------------------------------------------------- cache


def exact_cache_options(spec: Any) -> dict[str, Any]:
    """The options making a cache compute every step: thresholds 0, intervals 1."""
    return {k: (0.0 if "threshold" in k else 1) for k in spec.options if "threshold" in k or "interval" in k}


class CacheConformance(_ToySuite):
    """A cache strategy on the toy DiT: ``apply(model, layout, options)`` gives a handle with
    ``remove()``, ``reset()`` and ``stats()``; at ``exact_options`` (default: thresholds 0, intervals
    1) the output is bit-identical to the uncached one, step after step, directly and in a pipeline;
    at ``options`` (default: the spec's) a pipeline runs and ``set_cache(None)`` restores the output."""

    cache: ClassVar[str]
    exact_options: ClassVar[Mapping[str, Any] | None] = None
    options: ClassVar[Mapping[str, Any]] = {}
    steps: ClassVar[int] = 4

    def test_entry_module_is_light(self) -> None:
        assert_light_entry_module(difforge.get_registry().caches, self.cache)

    def _exact(self) -> dict[str, Any]:
        spec = difforge.get_registry().caches.get(self.cache)
        exact = dict(self.exact_options) if self.exact_options is not None else exact_cache_options(spec)
        if not exact:
            pytest.fail(f"cache {self.cache!r} has no threshold/interval option: set exact_options to options that compute every step", pytrace=False)
        return exact

    def test_exact_and_removable_on_the_toy_dit(self) -> None:
        spec = difforge.get_registry().caches.get(self.cache)
        model_spec = difforge.get_registry().models.get("toy-dit")
        model = tiny.random_model("toy-dit", tiny.tiny_config("toy-dit"))
        g = torch.Generator().manual_seed(1)
        inputs = [dict(latents=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([900.0 - 200 * i] * 2),
                       text=torch.randn(2, 5, 16, generator=g)) for i in range(self.steps)]
        with torch.no_grad():
            ref = [model(**x) for x in inputs]
        blocks = list(model.blocks)
        options = {**merge_options("cache strategy", spec.name, spec.options, self._exact()), "family": "toy"}
        handle = resolve(spec.apply)(model, model_spec.layout, options)
        for method in ("remove", "reset", "stats"):
            assert callable(getattr(handle, method, None)), f"cache {self.cache!r}: apply() must return a handle with {method}()"
        try:
            for _ in range(2):  # two "pipeline calls"
                handle.reset()
                with torch.no_grad():
                    for i, x in enumerate(inputs):
                        assert torch.equal(model(**x), ref[i]), f"cache {self.cache!r} at {self._exact()}: step {i} differs; it must compute every block"
            stats = handle.stats()
            assert isinstance(stats, Mapping), f"cache {self.cache!r}: stats() must return a mapping (steps, blocks skipped), got {stats!r}"
        finally:
            handle.remove()
        assert list(model.blocks) == blocks, f"cache {self.cache!r}: remove() did not put the original blocks back"
        with torch.no_grad():
            assert torch.equal(model(**inputs[0]), ref[0]), f"cache {self.cache!r}: after remove() the output differs"

    def test_toy_pipeline(self, toy_files: list[Path]) -> None:
        pipe = self.pipeline(toy_files)
        plain = pipe(**CALL)
        pipe.set_cache({"name": self.cache, **self._exact()})
        assert torch.equal(pipe(**CALL), plain), f"toy pipeline with cache {self.cache!r} at {self._exact()} differs from the plain run"
        pipe.set_cache({"name": self.cache, **self.options})
        cached = pipe(**{**CALL, "num_inference_steps": self.steps * 2})
        assert cached.isfinite().all(), f"toy pipeline with cache {self.cache!r} at {dict(self.options)} gives non-finite latents"
        assert pipe.cache_stats(), "the pipeline reports no cache statistics"
        pipe.set_cache(None)
        assert torch.equal(pipe(**CALL), plain), f"after set_cache(None) the toy pipeline differs: cache {self.cache!r} did not remove itself"


# ---------------------------------------------------------------- offload


class OffloadConformance(_ToySuite):
    """An offload backend on a toy pipeline, applied by the runtime (``offload=``): a ``location``
    backend changes no bit of the output, a ``dtype`` backend stays within ``tolerance`` (relative
    L2) and composes with ``sequential`` without changing a bit more; ``remove()`` on every handle
    puts back every tensor (bit for bit, same device and dtype)."""

    offload: ClassVar[str]
    options: ClassVar[Mapping[str, Any]] = {}
    tolerance: ClassVar[float] = 0.05

    def test_entry_module_is_light(self) -> None:
        assert_light_entry_module(difforge.get_registry().offload, self.offload)

    def _run(self, files: list[Path], offload: Any) -> tuple[torch.Tensor, difforge.Pipeline]:
        pipe = self.pipeline(files, offload=offload)
        return pipe(**CALL), pipe

    def test_toy_pipeline(self, toy_files: list[Path]) -> None:
        plain, ref_pipe = self._run(toy_files, None)
        states = {slot: {k: v.clone() for k, v in m.state_dict().items()} for slot, m in ref_pipe.models().items()}
        spec = difforge.get_registry().offload.get(self.offload)
        out, pipe = self._run(toy_files, {"name": self.offload, **self.options})
        what = f"toy pipeline with offload={self.offload!r} ({spec.kind})"
        if spec.kind == "location":
            assert torch.equal(out, plain), f"{what}: the latents differ; a location backend must not change a bit"
        else:
            err = _rel_l2(out, {"output": plain})
            assert err <= self.tolerance, f"{what}: relative L2 error {err:.3g} > tolerance {self.tolerance:g}"
        assert torch.equal(pipe(**CALL), out), f"{what}: a second call differs from the first"
        for handle in reversed(pipe._offload_handles):
            handle.remove()
        for slot, module in pipe.models().items():
            for key, value in module.state_dict().items():
                want = states[slot][key]
                assert value.dtype == want.dtype and value.device == want.device and torch.equal(value, want), (
                    f"{what}: after remove() {slot}.{key} is {value.dtype} on {value.device}, not what it was: remove() must restore every tensor"
                )

    def test_composes_with_sequential(self, toy_files: list[Path]) -> None:
        spec = difforge.get_registry().offload.get(self.offload)
        if spec.kind != "dtype":
            pytest.skip("a location backend is used alone (one location backend per pipeline)")
        alone, _ = self._run(toy_files, {"name": self.offload, **self.options})
        stacked, _ = self._run(toy_files, [{"name": self.offload, **self.options}, "sequential"])
        diff = _first_difference(stacked, {"output": alone})
        assert diff is None, f"offload=[{self.offload!r}, 'sequential'] differs from {self.offload!r} alone: {diff}"


# ---------------------------------------------------------------- schedulers


class SchedulerConformance(_ToySuite):
    """A scheduler follows :class:`difforge.schedulers.Scheduler`: ``timesteps`` ``[N]`` and ``sigmas``
    ``[N + 1]`` (non-increasing, ending at 0) after ``set_timesteps``; ``denoising_strength`` cuts the
    schedule; ``step`` and ``add_noise`` keep shape and dtype; the toy pipeline runs with it
    (text-to-image and image-to-image)."""

    scheduler: ClassVar[str]
    options: ClassVar[Mapping[str, Any]] = {}
    family: ClassVar[str] = "toy"

    def test_entry_module_is_light(self) -> None:
        assert_light_entry_module(difforge.get_registry().schedulers, self.scheduler)

    def build(self) -> Any:
        return build_scheduler({"name": self.scheduler, **self.options}, family=self.family)

    @pytest.mark.parametrize("steps", [1, 4, 28])
    def test_schedule(self, steps: int) -> None:
        s = self.build()
        assert isinstance(s, Scheduler), f"scheduler {self.scheduler!r}: its factory returned a {type(s).__name__} without the Scheduler methods"
        s.set_timesteps(steps, image_seq_len=256, device="cpu")
        assert s.timesteps.shape == (steps,) and s.sigmas.shape == (steps + 1,), (
            f"scheduler {self.scheduler!r}: {steps} steps give timesteps {list(s.timesteps.shape)} and sigmas {list(s.sigmas.shape)}; "
            f"expected [{steps}] and [{steps + 1}]"
        )
        sigmas = s.sigmas.double()
        assert bool((sigmas[1:] <= sigmas[:-1]).all()) and float(sigmas[-1]) == 0.0 and float(sigmas[0]) <= 1.0 + 1e-6, (
            f"scheduler {self.scheduler!r}: sigmas must fall from at most 1 to 0, got {s.sigmas.tolist()}"
        )
        x, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
        noisy = s.add_noise(x, noise, 0)
        assert noisy.shape == x.shape and noisy.dtype == x.dtype
        for i in range(steps):
            noisy = s.step(noise - x, i, noisy)
            assert noisy.shape == x.shape and noisy.dtype == x.dtype and bool(noisy.isfinite().all()), f"scheduler {self.scheduler!r}: step {i}"

    def test_denoising_strength(self) -> None:
        s = self.build()
        s.set_timesteps(10, denoising_strength=0.5, device="cpu")
        assert 1 <= len(s.timesteps) <= 6 and len(s.sigmas) == len(s.timesteps) + 1, (
            f"scheduler {self.scheduler!r}: denoising_strength=0.5 of 10 steps must leave about 5 steps, left {len(s.timesteps)}"
        )
        with pytest.raises(DifforgeError):
            s.set_timesteps(0)

    def test_toy_pipeline(self, toy_files: list[Path]) -> None:
        pipe = self.pipeline(toy_files, scheduler={"name": self.scheduler, **self.options})
        out = pipe(**{**CALL, "num_inference_steps": 4})
        assert out.shape == (1, 4, 4, 4) and bool(out.isfinite().all())
        image = pipe(**{**CALL, "output_type": "pt"})
        again = pipe(**{**CALL, "input_image": image * 2 - 1, "denoising_strength": 0.5, "output_type": "pt"})
        assert again.shape == image.shape and bool(again.isfinite().all()) and not math.isnan(float(again.mean()))
