"""difforge-cache on FLUX.1 (difforge-flux): exact at threshold 0 / interval 1 on the DiT and the whole
pipeline, and fbcache parity with diffusers' First Block Cache on a tiny FluxTransformer2DModel holding
the same weights, over whole denoising runs with two CFG branches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import difforge
import difforge_cache
from difforge import ModelConfig, Pipeline
from difforge.plugins import PluginSettings
from difforge.runtime.pipeline import cfg_branch
from difforge_cache.engine import apply_deepcache, apply_fbcache

diffusers = pytest.importorskip("diffusers")
difforge_flux = pytest.importorskip("difforge_flux")
from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache  # noqa: E402
from difforge_flux.convert import dit_from_diffusers, dit_fuse  # noqa: E402
from difforge_flux.dit import FluxDiT, flux_dit_config_from_shapes  # noqa: E402

LAYOUT = difforge_flux.BLOCK_LAYOUT
TINY = dict(
    in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), guidance_embeds=True,
)  # fmt: skip
STEPS = 10
BRANCHES = ("cond", "uncond")


@pytest.fixture(autouse=True, scope="module")
def cache_registry() -> Iterator[Any]:
    """difforge-flux, the text encoders and difforge-cache (replaces the toy registry of conftest.py)."""
    text_encoders = pytest.importorskip("difforge_text_encoders")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    plugins = [difforge_flux, text_encoders, difforge_cache]
    host = difforge.reload_plugins(PluginSettings(autoload=False), plugins=plugins)
    yield host.registry
    difforge.reload_plugins()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models() -> tuple[Any, FluxDiT]:
    """A tiny diffusers Flux transformer with N(0, 0.05) weights, and our FluxDiT with the same weights.

    Small weights keep the first block's residual change per step around 0.15-0.3, as a trained model's
    is around its thresholds, so that a threshold of 0.2 both computes and skips steps."""
    ref = diffusers.FluxTransformer2DModel(**TINY).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    sd = dit_fuse({dit_from_diffusers(k): v for k, v in ref.state_dict().items()})
    with torch.device("meta"):
        ours = FluxDiT(flux_dit_config_from_shapes({k: v.shape for k, v in sd.items()}))
    ours.load_state_dict(sd, assign=True)
    return ref, ours.eval()


@pytest.fixture(scope="module")
def inputs() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    height, width, text = 4, 6, 7
    n = height * width
    ids = torch.zeros(n, 3)
    ids[:, 1], ids[:, 2] = torch.arange(n) // width, torch.arange(n) % width
    return {
        "img": torch.randn(1, n, TINY["in_channels"], generator=gen),
        "img_ids": ids,
        "txt": {b: torch.randn(1, text, TINY["joint_attention_dim"], generator=gen) for b in BRANCHES},
        "txt_ids": torch.zeros(text, 3),
        "y": {b: torch.randn(1, TINY["pooled_projection_dim"], generator=gen) for b in BRANCHES},
        "guidance": torch.full((1,), 3.5),
    }


def denoise(predict: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor], img: torch.Tensor) -> torch.Tensor:
    """Euler steps from sigma 1 to 0 with classifier-free guidance 2.0 over the two branches."""
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1)
    for i in range(STEPS):
        cond, uncond = (predict(b, img, sigmas[i : i + 1]) for b in BRANCHES)
        img = img + (sigmas[i + 1] - sigmas[i]) * (uncond + 2.0 * (cond - uncond))
    return img


def ours_predict(model: FluxDiT, x: dict[str, Any]) -> Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]:
    def predict(branch: str, img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with cfg_branch(branch):
            return model(img, x["img_ids"], x["txt"][branch], x["txt_ids"], sigma, x["y"][branch], x["guidance"])

    return predict


def test_threshold_zero_and_interval_one_are_identical(models: tuple[Any, FluxDiT], inputs: dict[str, Any]) -> None:
    _, ours = models
    with torch.inference_mode():
        expected = denoise(ours_predict(ours, inputs), inputs["img"])
        for apply, options in ((apply_fbcache, {"threshold": 0.0}), (apply_deepcache, {"cache_interval": 1})):
            with apply(ours, LAYOUT, options) as handle:
                assert torch.equal(denoise(ours_predict(ours, inputs), inputs["img"]), expected)
            assert handle.stats()["blocks_skipped"] == 0 and handle.stats()["steps"] == 2 * STEPS


def test_fbcache_matches_diffusers_first_block_cache(models: tuple[Any, FluxDiT], inputs: dict[str, Any]) -> None:
    ref, ours = models
    threshold = 0.2
    x = inputs
    with torch.inference_mode():
        uncached = denoise(ours_predict(ours, x), x["img"])
        with apply_fbcache(ours, LAYOUT, {"threshold": threshold, "family": "flux"}) as handle:
            got = denoise(ours_predict(ours, x), x["img"])
        stats = handle.stats()

        apply_first_block_cache(ref, FirstBlockCacheConfig(threshold=threshold))
        head = ref.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
        ref_cached: dict[str, list[int]] = {b: [] for b in BRANCHES}
        steps = dict.fromkeys(BRANCHES, 0)

        def ref_predict(branch: str, img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            with ref.cache_context(branch):
                out = ref(
                    hidden_states=img, encoder_hidden_states=x["txt"][branch], pooled_projections=x["y"][branch],
                    timestep=sigma, img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"],
                ).sample  # fmt: skip
                if not head.state_manager.get_state().should_compute:
                    ref_cached[branch].append(steps[branch])
            steps[branch] += 1
            return out

        expected = denoise(ref_predict, x["img"])

    ours_cached = {b: stats["branches"][b]["cached_steps"] for b in BRANCHES}
    assert ours_cached == ref_cached
    assert all(0 < len(c) < STEPS - 1 for c in ours_cached.values()), ours_cached  # some steps of each kind
    blocks = len(ours.double_blocks) + len(ours.single_blocks)
    assert stats["blocks_skipped"] == sum(map(len, ours_cached.values())) * (blocks - 1)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got - uncached).abs().max().item() > 1e-3  # the cache did change the result, in the same way


# ------------------------------------------------------------ the whole pipeline


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory: pytest.TempPathFactory, cache_registry: Any) -> Pipeline:
    """A tiny random FLUX.1-dev-like release (the SDK's), assembled by the runtime."""
    tiny_flux = pytest.importorskip("difforge_sdk.tiny_flux")
    files = tiny_flux.write_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))
    weights = [ModelConfig(path=str(files[s])) for s in ("dit", "vae", "text_encoder", "text_encoder_2")]
    tokenizers = [ModelConfig(path=str(files["tokenizer"])), ModelConfig(path=str(files["tokenizer_2"]))]
    return Pipeline.from_pretrained("flux", model_configs=weights, tokenizer_config=tokenizers, device="cpu")


def dit_handle(pipe: Pipeline) -> Any:
    return next(h for h in pipe._cache_handles if h.model is pipe.dit)


def test_flux_pipeline_is_exact_at_threshold_zero_and_interval_one(flux_pipe: Pipeline) -> None:
    kw = dict(seed=0, height=64, width=64, num_inference_steps=6, output_type="latent", cfg_scale=2.0,
              progress_bar_cmd=lambda x: x)  # fmt: skip
    flux_pipe.set_cache(None)
    expected = flux_pipe("a cat", **kw)
    try:
        for cache in ({"name": "fbcache", "threshold": 0.0}, {"name": "deepcache", "cache_interval": 1}):
            flux_pipe.set_cache(cache)
            assert torch.equal(flux_pipe("a cat", **kw), expected)
            stats = dit_handle(flux_pipe).stats()
            assert stats["steps"] == 12 and set(stats["branches"]) == {"cond", "uncond"}
        flux_pipe.set_cache("fbcache")
        assert dit_handle(flux_pipe).threshold == 0.08  # the family default
    finally:
        flux_pipe.set_cache(None)


def test_flux_pipeline_caches_only_the_dit(flux_pipe: Pipeline) -> None:
    try:
        flux_pipe.set_cache("fbcache")
        assert [h.model for h in flux_pipe._cache_handles] == [flux_pipe.dit]
    finally:
        flux_pipe.set_cache(None)
