"""U-Net LoRAs: a kohya SD LoRA applied by difforge (fused and hot) against diffusers' ``load_lora_weights``,
and the name mappings of the other spellings (PEFT, kohya with original block names)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from difforge_sdk.parity import MODULE_ATOL, assert_close

import difforge
from difforge import Pipeline
from difforge_sd.lora import rename_unet_diffusers, rename_unet_kohya

from .sd_helpers import unet_inputs, write_pipeline

_TARGETS = re.compile(r"(attn[12]\.to_(q|k|v|out\.0)|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2)$")


def _kohya_lora(unet: torch.nn.Module, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random kohya LoRA on every attention projection of a diffusers U-Net (linears and 1x1 convs)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in unet.named_modules():
        if not _TARGETS.search(name):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        w = module.weight
        extra = tuple(w.shape[2:])
        out[f"{key}.lora_down.weight"] = torch.randn(rank, w.shape[1], *extra, generator=g) * 0.3
        out[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, *(1,) * len(extra), generator=g) * 0.3
        out[f"{key}.alpha"] = torch.tensor(1.0)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: Any) -> Any:
    from diffusers import DDIMScheduler

    return write_pipeline(tmp_path_factory.mktemp("lora-sd"), "sd", DDIMScheduler(beta_schedule="scaled_linear"))


def test_kohya_lora_matches_diffusers_load_lora_weights(folder):
    from diffusers import StableDiffusionPipeline

    difforge.reload_plugins()
    ref = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    lora = _kohya_lora(ref.unet)
    inputs = unet_inputs("sd")
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    with torch.no_grad():
        before = ref.unet(*args).sample
        ref.load_lora_weights({k: v.clone() for k, v in lora.items()}, adapter_name="tiny")
        want = ref.unet(*args).sample
    assert (want - before).abs().max() > 1e-2  # the LoRA matters

    pipe = Pipeline.from_pretrained("sd", str(folder), device="cpu")
    for fuse in (True, False):
        name = pipe.load_lora(lora, scale=1.0, fuse=fuse)
        with torch.no_grad():
            got = pipe.unet(**inputs)
        assert_close(got, want, atol=MODULE_ATOL, name=f"U-Net with a kohya LoRA ({'fused' if fuse else 'hot'})")
        pipe.clear_lora(name)
        with torch.no_grad():
            assert_close(pipe.unet(**inputs), before, atol=MODULE_ATOL, name="after clear_lora")


def test_peft_lora_on_sdxl_matches_diffusers(tmp_path):
    """A diffusers/PEFT LoRA (``unet.`` names, ``lora_A``/``lora_B``) on the SDXL U-Net."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    difforge.reload_plugins()
    folder = write_pipeline(tmp_path, "sdxl", EulerDiscreteScheduler())
    ref = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    kohya = _kohya_lora(ref.unet, seed=1)
    peft = {}
    for key, value in kohya.items():
        module, suffix = key.split(".", 1)
        name = "unet." + next(n for n, _ in ref.unet.named_modules() if "lora_unet_" + n.replace(".", "_") == module)
        if suffix != "alpha":  # PEFT files carry no alpha: the scale is 1 (rank 2, alpha 2)
            peft[f"{name}.{'lora_A' if suffix.startswith('lora_down') else 'lora_B'}.weight"] = value
    inputs = unet_inputs("sdxl")
    cond = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    with torch.no_grad():
        before = ref.unet(*args, added_cond_kwargs=cond).sample
        ref.load_lora_weights({k: v.clone() for k, v in peft.items()}, adapter_name="tiny")
        want = ref.unet(*args, added_cond_kwargs=cond).sample
    assert (want - before).abs().max() > 1e-2
    pipe = Pipeline.from_pretrained("sdxl", str(folder), device="cpu")
    pipe.load_lora(peft)
    with torch.no_grad():
        assert_close(pipe.unet(**inputs), want, atol=MODULE_ATOL, name="SDXL U-Net with a PEFT LoRA")


def test_other_spellings_name_the_same_modules():
    own = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    assert rename_unet_diffusers("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight") == own
    assert rename_unet_diffusers("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight") == own
    # kohya with the original (SGM) block names, as SDXL LoRAs are written: input_blocks.4 = block 1, layer 0
    assert rename_unet_kohya("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight") == own
    assert rename_unet_kohya("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight") == own
    assert rename_unet_kohya("lora_unet_mid_block_attentions_0_proj_in.lora_up.weight") == "mid_blocks.0.attentions.0.proj_in.lora_B.weight"
    assert rename_unet_kohya("lora_unet_middle_block_1_proj_in.alpha") == "mid_blocks.0.attentions.0.proj_in.alpha"
    assert rename_unet_kohya("lora_unet_output_blocks_3_0_in_layers_2.lora_down.weight") == "up_blocks.1.resnets.0.conv1.lora_A.weight"
    assert rename_unet_kohya("lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj.lora_down.weight") == (
        "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.lora_A.weight"
    )
    assert rename_unet_kohya("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight") is None
    assert rename_unet_diffusers("transformer.transformer_blocks.0.attn.to_q.lora_A.weight") is None  # a Flux LoRA
