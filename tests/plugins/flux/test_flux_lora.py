"""Flux LoRAs against diffusers: a tiny LoRA made with PEFT on the tiny diffusers FluxPipeline, saved with
``FluxPipeline.save_lora_weights`` and loaded by diffusers (``load_lora_weights``) and by us, fused and
hot, in every layout our converters read (the other layouts are written by our inverse key maps).

Every comparison runs the whole pipeline (text encoders, DiT, AE) on the same initial noise in float32.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import difforge
from difforge import Pipeline
from difforge.lora import lora_manager
from difforge_sdk.parity_pipelines import write_flux

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PROMPT = "a cat holding a sign"
SIZE = 32
CALL = dict(height=SIZE, width=SIZE, num_inference_steps=2, output_type="np", progress_bar_cmd=lambda x: x)
DIT_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp", "proj_out",
    "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "ff.net.0.proj", "ff.net.2",
    "ff_context.net.0.proj", "ff_context.net.2", "x_embedder", "context_embedder", "linear_1", "linear_2",
]
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# double blocks only: diffusers' kohya reader assumes FLUX.1's widths for the single blocks' linear1
DOUBLE_TARGETS = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)|ff\.net\.2)"


@pytest.fixture(autouse=True)
def _registry() -> Any:
    difforge.reload_plugins()
    yield


@pytest.fixture(scope="module", autouse=True)
def _threads() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(module: torch.nn.Module, seed: int, std: float, only_lora: bool = False) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not only_lora or "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (std if p.dim() > 1 else std / 3))


def _peft_lora(folder: Path, out: Path, seed: int, targets: list[str] | str, clip: bool) -> Path:
    """A random PEFT LoRA (rank 4, alpha 8, one module at alpha 2) saved by diffusers with its metadata."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, alpha_pattern={"to_k": 2}, target_modules=targets, init_lora_weights=False)
    ref.transformer.add_adapter(config)
    _randomize(ref.transformer, seed, 0.2, only_lora=True)
    kw: dict[str, Any] = {
        "transformer_lora_layers": get_peft_model_state_dict(ref.transformer),
        "transformer_lora_adapter_metadata": ref.transformer.peft_config["default"].to_dict(),
    }
    if clip:
        te_config = LoraConfig(r=2, lora_alpha=3, target_modules=CLIP_TARGETS, init_lora_weights=False)
        ref.text_encoder.add_adapter(te_config)
        _randomize(ref.text_encoder, seed + 1, 0.2, only_lora=True)
        kw["text_encoder_lora_layers"] = get_peft_model_state_dict(ref.text_encoder)
        kw["text_encoder_lora_adapter_metadata"] = ref.text_encoder.peft_config["default"].to_dict()
    FluxPipeline.save_lora_weights(out, weight_name="lora.safetensors", **kw)
    return out / "lora.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: Any) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("flux-lora")
    folder = write_flux(root, dit_layers=3, vae_dim_mult=(1, 1, 1, 1), std={"dit": 0.3, "vae": 0.3, "text": 0.3})
    return {
        "folder": folder,
        "lora": _peft_lora(folder, root / "a", seed=10, targets=DIT_TARGETS, clip=True),
        "lora_b": _peft_lora(folder, root / "b", seed=20, targets=["to_q", "to_v", "proj_mlp", "ff.net.2"], clip=False),
        "attention": _peft_lora(folder, root / "c", seed=30, targets=ATTENTION_TARGETS, clip=False),
        "double": _peft_lora(folder, root / "d", seed=40, targets=DOUBLE_TARGETS, clip=False),
        "noise": torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0)),
    }


def _reference(tiny: dict[str, Any], *loras: tuple[Path, float]) -> np.ndarray:
    """diffusers' FluxPipeline with ``loras`` (path, weight) loaded by ``load_lora_weights``."""
    from diffusers import FluxPipeline

    from difforge_flux.pipeline import pack_latents

    ref = FluxPipeline.from_pretrained(tiny["folder"], torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    names = []
    for i, (path, _) in enumerate(loras):
        ref.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    if names:
        ref.set_adapters(names, [w for _, w in loras])
    return ref(PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=3.5,
               latents=pack_latents(tiny["noise"]), output_type="np").images


@pytest.fixture(scope="module")
def expected(tiny: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"base": _reference(tiny), "lora": _reference(tiny, (tiny["lora"], 1.0))}


def _pipe(tiny: dict[str, Any], **kw: Any) -> Pipeline:
    return Pipeline.from_pretrained("flux", str(tiny["folder"]), device="cpu", **kw)


def _run(pipe: Pipeline, tiny: dict[str, Any]) -> np.ndarray:
    return pipe(PROMPT, latents=tiny["noise"], embedded_guidance=3.5, **CALL)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


# ---------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "hot"])
def test_diffusers_lora_matches_diffusers(tiny, expected, fuse):
    pipe = _pipe(tiny)
    base = _run(pipe, tiny)
    assert _diff(base, expected["base"]) < 1e-3
    assert _diff(expected["lora"], expected["base"]) > 1e-2  # the LoRA matters
    name = pipe.load_lora(str(tiny["lora"]), fuse=fuse, target="all")
    entry = lora_manager(pipe).loras[name]
    assert entry.fused is fuse and entry.formats == {"dit": "diffusers", "text_encoder": "diffusers"}
    assert _diff(_run(pipe, tiny), expected["lora"]) < 1e-3
    pipe.clear_lora()
    assert np.array_equal(_run(pipe, tiny), base)


def test_two_loras_and_scales_match_diffusers(tiny):
    want = _reference(tiny, (tiny["lora"], 0.5), (tiny["lora_b"], 1.5))
    pipe = _pipe(tiny)
    pipe.load_lora(tiny["lora"], target="all", name="a")  # fused
    pipe.load_lora(tiny["lora_b"], fuse=False, name="b", scale=0.25)  # hot, on some of the same layers
    pipe.set_lora_scale("a", 0.5)
    pipe.set_lora_scale("b", 1.5)
    assert _diff(_run(pipe, tiny), want) < 1e-3


def test_layouts_from_our_inverse_maps_give_the_same_image(tiny, expected, tmp_path):
    """Each layout written by our inverse maps loads (fused and hot) to the original's image."""
    cases = [
        ("all", "kohya", "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"),
        ("all", "comfyui", "diffusion_model.single_blocks.1.linear1.lora_A.weight"),
        ("dit", "comfyui", "diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight"),  # prefix stripped
        ("all", "diffusers", "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"),
        ("dit", "diffsynth", "blocks.0.attn.a_to_qkv.lora_A.default.weight"),  # DiffSynth: DiT names only
    ]
    pipe = _pipe(tiny)
    want = {}
    for target in ("all", "dit"):
        pipe.load_lora(tiny["lora"], target=target, name=target, fuse=False)
        want[target] = _run(pipe, tiny)
        pipe.clear_lora()
    assert _diff(want["all"], expected["lora"]) < 1e-3
    other = _pipe(tiny)
    for target, fmt, probe in cases:
        pipe.load_lora(tiny["lora"], target=target, name="src", fuse=False)
        path = pipe.export_lora("src", tmp_path / f"{fmt}.safetensors", format=fmt)
        pipe.clear_lora()
        assert probe in load_file(str(path)), fmt
        if fmt == "diffusers":  # diffusers reads our diffusers files (alphas as keys, CLIP part included)
            assert _diff(_reference(tiny, (path, 1.0)), expected["lora"]) < 1e-3
        for fuse in (True, False):
            other.load_lora(path, target="all", fuse=fuse, name=fmt)
            assert lora_manager(other).loras[fmt].formats["dit"] == fmt
            assert _diff(_run(other, tiny), want[target]) < 1e-5, (fmt, fuse)
            other.clear_lora()
    with pytest.raises(difforge.ConversionError, match="formats available for it"):
        pipe.load_lora(tiny["lora"], target="all", name="src")
        pipe.export_lora("src", tmp_path / "x.safetensors", format="diffsynth")  # no DiffSynth CLIP names


def test_kohya_diffusers_names_match_diffusers(tiny, tmp_path):
    """sd-scripts' spelling of diffusers names (``lora_transformer_transformer_blocks_0_attn_to_q`` with
    ``alpha``), made from the PEFT file by key map: diffusers (whose reader of this spelling covers the
    attention layers) and difforge give the PEFT original's image."""
    from difforge.lora import read_lora

    kohya = {}
    for key, value in read_lora(tiny["attention"]).tensors.items():  # the PEFT alphas are keys here
        module, _, suffix = key.removeprefix("transformer.").rpartition(".lora_")
        if key.endswith(".alpha"):
            module, suffix = key.removeprefix("transformer.").removesuffix(".alpha"), "alpha"
        else:
            suffix = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[suffix]
        kohya[f"lora_transformer_{module.replace('.', '_')}.{suffix}"] = value
    path = tmp_path / "kohya_diffusers.safetensors"
    save_file(kohya, str(path))
    want = _reference(tiny, (tiny["attention"], 1.0))
    assert _diff(_reference(tiny, (path, 1.0)), want) < 1e-3
    pipe = _pipe(tiny)
    pipe.load_lora(path)
    assert lora_manager(pipe).loras["kohya_diffusers"].formats == {"dit": "kohya"}
    assert _diff(_run(pipe, tiny), want) < 1e-3


def test_diffsynth_names_from_its_own_table(tiny):
    """DiffSynth-Studio's module names (from its ``FluxDiTStateDictConverter`` table, not our map) with
    ``.default`` adapter names and no alpha (its loader applies none: folded into lora_B here)."""
    from difforge.lora import read_lora

    src = read_lora(tiny["lora"]).tensors  # the PEFT alphas are keys here
    table = {
        "transformer_blocks.0.ff.net.0.proj": "blocks.0.ff_a.0",
        "transformer_blocks.0.norm1_context.linear": "blocks.0.norm1_b.linear",
        "single_transformer_blocks.1.proj_out": "single_blocks.1.proj_out",
        "norm_out.linear": "final_norm_out.linear",  # (scale, shift), as diffusers
        "time_text_embed.text_embedder.linear_1": "pooled_text_embedder.0",
    }
    peft, diffsynth = {}, {}
    for theirs, ds in table.items():
        A, B = src[f"transformer.{theirs}.lora_A.weight"], src[f"transformer.{theirs}.lora_B.weight"]
        alpha = src[f"transformer.{theirs}.alpha"]
        peft.update({f"transformer.{theirs}.lora_A.weight": A, f"transformer.{theirs}.lora_B.weight": B,
                     f"transformer.{theirs}.alpha": alpha})
        diffsynth.update({f"{ds}.lora_A.default.weight": A, f"{ds}.lora_B.default.weight": B * float(alpha) / A.shape[0]})
    pipe = _pipe(tiny)
    pipe.load_lora(peft, name="peft", fuse=False)
    want = _run(pipe, tiny)
    pipe.clear_lora()
    pipe.load_lora(diffsynth, name="ds")
    assert lora_manager(pipe).loras["ds"].formats == {"dit": "diffsynth"}
    assert _diff(_run(pipe, tiny), want) < 1e-5


def test_kohya_layout_matches_diffusers(tiny, tmp_path):
    """A LoRA on the double blocks written in sd-scripts' layout (``lora_unet_double_blocks_0_img_attn_qkv``,
    q/k/v merged block-diagonally, alphas) by our inverse map: diffusers' kohya reader splits it back and
    agrees with the PEFT original, and so do we."""
    want = _reference(tiny, (tiny["double"], 1.0))
    pipe = _pipe(tiny)
    pipe.load_lora(tiny["double"], name="peft")
    assert _diff(_run(pipe, tiny), want) < 1e-3
    path = pipe.export_lora("peft", tmp_path / "kohya.safetensors", format="kohya")
    assert "lora_unet_double_blocks_0_txt_attn_qkv.alpha" in load_file(str(path))
    assert _diff(_reference(tiny, (path, 1.0)), want) < 1e-3
    pipe.clear_lora()
    pipe.load_lora(path, fuse=False)
    assert _diff(_run(pipe, tiny), want) < 1e-3


def test_xlabs_layout_matches_diffusers(tiny, tmp_path):
    """An attention-only LoRA written in XLabs' layout by our inverse map: diffusers (which reads XLabs
    files) and difforge agree with the PEFT original."""
    want = _reference(tiny, (tiny["attention"], 1.0))
    pipe = _pipe(tiny)
    pipe.load_lora(tiny["attention"], name="peft")
    assert _diff(_run(pipe, tiny), want) < 1e-3
    path = pipe.export_lora("peft", tmp_path / "xlabs.safetensors", format="xlabs")
    assert "double_blocks.0.processor.qkv_lora2.up.weight" in load_file(str(path))
    assert _diff(_reference(tiny, (path, 1.0)), want) < 1e-3
    pipe.clear_lora()
    pipe.load_lora(path, fuse=False)
    assert _diff(_run(pipe, tiny), want) < 1e-3
    with pytest.raises(difforge.ConversionError, match="XLabs"):  # proj_mlp has no XLabs spelling
        other = _pipe(tiny)
        other.load_lora(tiny["lora_b"], name="b")
        other.export_lora("b", tmp_path / "x.safetensors", format="xlabs")


def test_text_encoder_parts_in_kohya_and_comfyui_names(tiny, tmp_path):
    """CLIP in kohya's ``lora_te1_`` names and T5 in ComfyUI's ``text_encoders.t5xxl.transformer.`` names,
    beside a kohya DiT LoRA, in one file: each part goes to its component."""
    gen = torch.Generator().manual_seed(7)

    def pair(prefix: str, n_in: int, n_out: int, down: str = "lora_down", up: str = "lora_up") -> dict:
        return {f"{prefix}.{down}.weight": torch.randn(2, n_in, generator=gen) * 0.5,
                f"{prefix}.{up}.weight": torch.randn(n_out, 2, generator=gen) * 0.5, f"{prefix}.alpha": torch.tensor(1.0)}

    sd = {
        **pair("lora_unet_double_blocks_0_img_attn_proj", 32, 32),
        **pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32, 32),
        **pair("text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0", 32, 37, "lora_A", "lora_B"),
    }
    path = tmp_path / "te.safetensors"
    save_file(sd, str(path))
    pipe = _pipe(tiny)
    base = _run(pipe, tiny)
    pipe.load_lora(path, target="all", fuse=True)
    entry = lora_manager(pipe).loras["te"]
    assert entry.formats == {"dit": "kohya", "text_encoder": "kohya", "text_encoder_2": "comfyui"}
    fused = _run(pipe, tiny)
    assert _diff(fused, base) > 1e-3
    pipe.clear_lora()
    pipe.load_lora(path, target=["text_encoder", "text_encoder_2", "dit"], fuse=False)
    assert _diff(_run(pipe, tiny), fused) < 1e-5
    pipe.clear_lora()
    assert np.array_equal(_run(pipe, tiny), base)


# ---------------------------------------------------------------- exactness of clearing


def test_fuse_then_clear_restores_every_weight_bit_for_bit(tiny):
    pipe = _pipe(tiny)
    before = {(s, k): (t, t.clone()) for s, m in pipe.models().items() for k, t in m.state_dict(keep_vars=True).items()}
    pipe.load_lora(tiny["lora"], target="all", fuse=True)
    pipe.load_lora(tiny["lora_b"], fuse=True, scale=0.3)
    changed = [key for key, (t, c) in before.items() if not torch.equal(t, c)]
    assert any(s == "dit" for s, _ in changed) and any(s == "text_encoder" for s, _ in changed)
    pipe.set_lora_scale("lora", 2.0)
    pipe.clear_lora("lora")
    pipe.clear_lora()
    after = {(s, k): t for s, m in pipe.models().items() for k, t in m.state_dict(keep_vars=True).items()}
    for key, (obj, copy) in before.items():
        assert after[key] is obj  # the same Parameter objects...
        assert obj.dtype == copy.dtype and torch.equal(obj, copy), key  # ...holding the same bits


def test_hot_then_clear_is_bit_identical_and_scale_zero_is_off(tiny):
    pipe = _pipe(tiny)
    base = _run(pipe, tiny)
    pipe.load_lora(tiny["lora"], target="all", fuse=False)
    pipe.set_lora_scale("lora", 0.0)
    assert np.array_equal(_run(pipe, tiny), base)
    pipe.clear_lora()
    assert np.array_equal(_run(pipe, tiny), base)
    assert not any(m._forward_hooks for c in pipe.models().values() for m in c.modules())


# ---------------------------------------------------------------- errors, strictness, offload


def test_strict_lists_unknown_and_mismatched_keys(tiny, tmp_path, caplog):
    sd = load_file(str(tiny["lora"]))
    sd["transformer.transformer_blocks.7.attn.to_q.lora_A.weight"] = torch.zeros(4, 32)  # no block 7
    sd["transformer.transformer_blocks.7.attn.to_q.lora_B.weight"] = torch.zeros(32, 4)
    sd["transformer.something_else.weight"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    pipe = _pipe(tiny)
    with pytest.raises(difforge.ConversionError, match=r"something_else(.|\n)*double_blocks\.7\.img_attn\.qkv"):
        pipe.load_lora(path, target="all")
    assert not lora_manager(pipe).loras
    with caplog.at_level(logging.WARNING, logger="difforge.lora"):
        pipe.load_lora(path, target="all", strict=False)
    assert "skipped 1 unknown key(s) and 1 mismatched module(s)" in caplog.text


def test_fp8_and_offload_use_hot_loras(tiny):
    pytest.importorskip("difforge_fp8")
    pipe = _pipe(tiny, offload=["fp8", "sequential"])
    base = _run(pipe, tiny)
    with pytest.raises(difforge.ConfigError, match="fp8|float8|streaming"):
        pipe.load_lora(tiny["lora"], fuse=True)
    pipe.load_lora(tiny["lora"], target="all")  # fuse=None: hot under offload
    assert not lora_manager(pipe).loras["lora"].fused
    out = _run(pipe, tiny)
    assert _diff(out, base) > 1e-2
    pipe.clear_lora()
    assert np.array_equal(_run(pipe, tiny), base)
