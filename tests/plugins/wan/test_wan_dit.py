"""The Wan DiT against diffusers' WanTransformer3DModel on tiny random weights (Wan2.1 T2V and Wan2.2
TI2V configs, one timestep per sample and one per token), the converter, config inference, and the
block layout contract cache and offload plugins rely on."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import difforge
from difforge_wan.convert import dit_from_diffusers, dit_to_diffusers, is_wan_dit_diffusers
from difforge_wan.dit import (
    WAN21_T2V_1_3B,
    WAN22_TI2V_5B,
    WanDiT,
    WanDiTConfig,
    default_heads,
    wan_dit_config_from_json,
    wan_dit_config_from_shapes,
)

from .conftest import build_from, own_from_diffusers, randomize

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-4
TINY_DIT = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, text_dim=24, freq_dim=32, ffn_dim=40,
    num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
)  # fmt: skip
CHANNELS = {"2.1": 16, "2.2": 48}


@dataclass
class DiTPair:
    version: str
    ref: Any
    ours: WanDiT
    x: torch.Tensor
    context: torch.Tensor

    def ref_forward(self, timestep: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x if x is None else x
        return self.ref(hidden_states=x, timestep=timestep, encoder_hidden_states=self.context).sample


def make_dit_pair(version: str) -> DiTPair:
    channels = CHANNELS[version]
    ref = diffusers.WanTransformer3DModel(**TINY_DIT, in_channels=channels, out_channels=channels).eval()
    randomize(ref, seed=0, std=0.2)
    sd = own_from_diffusers(ref.state_dict(), dit_from_diffusers, None)
    config = wan_dit_config_from_json(dict(ref.config, _class_name="WanTransformer3DModel"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, 3, 4, 6, generator=gen)
    context = torch.randn(2, 7, TINY_DIT["text_dim"], generator=gen)
    return DiTPair(version, ref, build_from(sd, WanDiT, config), x, context)


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def dit_pair(request: pytest.FixtureRequest) -> DiTPair:
    return make_dit_pair(request.param)


@torch.no_grad()
def test_forward_matches_diffusers(dit_pair) -> None:
    t = torch.tensor([999.0, 312.0])
    expected = dit_pair.ref_forward(t)
    ours = dit_pair.ours(dit_pair.x, t, dit_pair.context)
    assert ours.shape == expected.shape == dit_pair.x.shape
    assert (ours - expected).abs().max() < ATOL


@torch.no_grad()
def test_per_token_timesteps_match_diffusers(dit_pair) -> None:
    """TI2V: the first frame's tokens at timestep 0 (diffusers' ``expand_timesteps``), others at t."""
    tokens_per_frame = 2 * 3
    t = torch.full((2, 3 * tokens_per_frame), 700.0)
    t[:, :tokens_per_frame] = 0.0
    t[1, tokens_per_frame:] = 123.0
    expected = dit_pair.ref_forward(t)
    assert (dit_pair.ours(dit_pair.x, t, dit_pair.context) - expected).abs().max() < ATOL
    # equal per-token timesteps are the per-sample path
    uniform = torch.full((2, 3 * tokens_per_frame), 500.0)
    per_sample = dit_pair.ours(dit_pair.x, torch.tensor([500.0, 500.0]), dit_pair.context)
    assert (dit_pair.ours(dit_pair.x, uniform, dit_pair.context) - per_sample).abs().max() < 1e-5


@torch.no_grad()
def test_bfloat16_is_close(dit_pair) -> None:
    t = torch.tensor([600.0, 200.0])
    expected = dit_pair.ours(dit_pair.x, t, dit_pair.context)
    model = copy.deepcopy(dit_pair.ours).to(torch.bfloat16)
    out = model(dit_pair.x.bfloat16(), t, dit_pair.context.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().mean() < 0.05 * expected.abs().mean()


def test_converter_round_trip_and_config(dit_pair) -> None:
    ref_sd = dit_pair.ref.state_dict()
    assert is_wan_dit_diffusers(list(ref_sd))
    assert not is_wan_dit_diffusers([*ref_sd, "condition_embedder.image_embedder.norm1.weight"])  # I2V: not claimed
    back = {dit_to_diffusers(k): v for k, v in dit_pair.ours.state_dict().items()}
    assert set(back) == set(ref_sd)
    for key, value in ref_sd.items():
        assert torch.equal(back[key], value), key
    shapes = {k: v.shape for k, v in dit_pair.ours.state_dict().items()}
    inferred = wan_dit_config_from_shapes(shapes)
    assert inferred == dataclasses.replace(dit_pair.ours.config, num_heads=default_heads(32))  # heads: from json only
    wan_json = {"_class_name": "WanModel", "model_type": "t2v", "dim": 32, "num_heads": 2, "num_layers": 2}
    assert wan_dit_config_from_json(wan_json, shapes) == dit_pair.ours.config
    assert wan_dit_config_from_json({**wan_json, "model_type": "i2v"}, shapes) is None


def test_released_configs_from_shapes() -> None:
    for config in (WAN21_T2V_1_3B, WAN22_TI2V_5B):
        with torch.device("meta"):
            sd = WanDiT(config).state_dict()
        assert wan_dit_config_from_shapes({k: v.shape for k, v in sd.items()}) == config
    assert WAN21_T2V_1_3B.rope_axes == (44, 42, 42)
    assert wan_dit_config_from_shapes({"patch_embedding.weight": (32, 16, 1, 2, 2)}) is None


@torch.no_grad()
def test_blocks_follow_the_layout(dit_pair, wan_registry) -> None:
    """Each block takes ``x`` first and returns it (what cache and offload plugins rely on): running the
    blocks by hand through the layout reproduces forward."""
    spec = wan_registry.models.get("wan-dit")
    (group,) = spec.layout.groups
    assert group.path == "blocks" and group.streams == ("x",)
    model, t = dit_pair.ours, torch.tensor([400.0, 800.0])
    seen = []
    handles = [b.register_forward_hook(lambda m, args, kwargs, out: seen.append(out.shape), with_kwargs=True)
               for b in model.blocks]  # fmt: skip
    try:
        model(dit_pair.x, t, dit_pair.context)
    finally:
        for h in handles:
            h.remove()
    assert seen == [torch.Size([2, 3 * 2 * 3, 32])] * len(model.blocks)


def test_bad_inputs_are_refused(dit_pair) -> None:
    with pytest.raises(difforge.ConfigError, match="multiple of the patch size"):
        dit_pair.ours(dit_pair.x[..., :3], torch.tensor([1.0, 1.0]), dit_pair.context)
    with pytest.raises(difforge.ConfigError, match="one per token"):
        dit_pair.ours(dit_pair.x, torch.ones(2, 5), dit_pair.context)
    with pytest.raises(difforge.ConfigError, match="heads"):
        WanDiT(WanDiTConfig(dim=30, num_heads=4))


def test_keep_high_precision_patterns(wan_registry) -> None:
    """fp8 and other dtype backends leave norms, modulation tables and embeddings alone."""
    from fnmatch import fnmatch

    spec = wan_registry.models.get("wan-dit")
    keep = lambda key: any(fnmatch(key, p) for p in spec.keep_high_precision)  # noqa: E731
    assert keep("blocks.3.modulation") and keep("head.modulation") and keep("blocks.0.norm3.weight")
    assert keep("blocks.0.self_attn.norm_q.weight") and keep("time_projection.1.weight")
    assert not keep("blocks.0.self_attn.q.weight") and not keep("blocks.0.ffn.0.weight")
