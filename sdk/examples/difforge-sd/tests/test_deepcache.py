"""DeepCache on the U-Net in its original form, through difforge-cache's generic block engine.

On a cached step only the first ``cache_branch_id`` down blocks and the last ``cache_branch_id`` up
blocks run: the deep features (the input of the first fresh up block) are the ones stored at the last
full step, and the fresh up blocks take the fresh skip connections of the fresh down blocks.
"""

from __future__ import annotations

import pytest
import torch
from difforge_sdk.parity import assert_close

from difforge._names import resolve
from difforge_sd import UNET_LAYOUT

from .sd_helpers import diffusers_unet, own_unet, unet_inputs


def _deepcache_by_hand(unet, inputs_full, inputs_cached, branch: int) -> torch.Tensor:
    """The cached step computed explicitly: fresh shallow blocks around the deep feature of the full step."""
    from difforge_sd.unet import timestep_embedding

    def embed(inputs):
        c = unet.config
        t = inputs["timestep"]
        temb = unet.time_embedding(timestep_embedding(t, c.block_out_channels[0]))
        if c.addition_embed_dim:
            ids = timestep_embedding(inputs["time_ids"].reshape(-1), c.addition_time_embed_dim).reshape(t.shape[0], -1)
            temb = temb + unet.add_embedding(torch.cat([inputs["text_embeds"], ids], dim=-1))
        return dict(temb=temb, encoder_hidden_states=inputs["encoder_hidden_states"])

    n = len(unet.down_blocks)
    # the full step: keep the input of up block n - branch
    kw = embed(inputs_full) | {"skips": []}
    h = unet.conv_in(inputs_full["sample"])
    for block in [*unet.down_blocks, *unet.mid_blocks, *unet.up_blocks[: n - branch]]:
        h = block(h, **kw)
    deep = h
    # the cached step: fresh shallow blocks, the stored deep feature in between
    kw = embed(inputs_cached) | {"skips": []}
    h = unet.conv_in(inputs_cached["sample"])
    for block in unet.down_blocks[:branch]:
        h = block(h, **kw)
    h = deep
    for block in unet.up_blocks[n - branch :]:
        h = block(h, **kw)
    return unet.conv_out(torch.nn.functional.silu(unet.conv_norm_out(h)))


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_cached_step_is_deepcache(kind, registry):
    unet = own_unet(diffusers_unet(kind))
    first, second = unet_inputs(kind, seed=0), unet_inputs(kind, seed=1)
    apply = resolve(registry.caches.get("deepcache").apply)
    with torch.no_grad():
        want = _deepcache_by_hand(unet, first, second, branch=1)
        fresh = unet(**second)
        handle = apply(unet, UNET_LAYOUT, {"cache_interval": 2, "cache_branch_id": 1})
        try:
            unet(**first)
            got = unet(**second)
            stats = handle.stats()
        finally:
            handle.remove()
    assert stats["steps_cached"] == 1 and stats["blocks_skipped"] == 3  # down 1, mid, up 0
    assert_close(got, want, atol=1e-5, name=f"{kind}: cached step vs DeepCache by hand")
    assert (got - fresh).abs().max() > 1e-3  # and it is not the uncached output
    assert torch.equal(unet(**second), fresh)  # removed: the plain model again


def test_fbcache_reuses_the_output_on_a_unet(registry):
    """First Block Cache on a U-Net: the first down block's output decides; a skipped step reuses the
    stored output of the rest (no residual can be added across resolutions)."""
    unet = own_unet(diffusers_unet("sd"))
    inputs = unet_inputs("sd")
    apply = resolve(registry.caches.get("fbcache").apply)
    with torch.no_grad():
        fresh = unet(**inputs)
        handle = apply(unet, UNET_LAYOUT, {"threshold": 0.05})
        try:
            first, again = unet(**inputs), unet(**inputs)  # the same input: no change, the second is cached
            nudged = unet(**{**inputs, "sample": inputs["sample"] * 1.5})  # a large change: computed
            stats = handle.stats()
        finally:
            handle.remove()
    assert stats["steps_cached"] == 1 and stats["steps_computed"] == 2
    assert torch.equal(first, fresh) and torch.equal(again, fresh)
    assert (nudged - fresh).abs().max() > 1e-3
