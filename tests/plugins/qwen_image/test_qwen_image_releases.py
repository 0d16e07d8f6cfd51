"""Fingerprints of the released checkpoints, registration, and detection of real-size headers
(sparse files: the real names and shapes over a hole)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import difforge
import difforge_qwen_image
from difforge_qwen_image.dit import QWEN_IMAGE
from difforge_qwen_image.releases import released_fingerprints, released_shapes

TRANSFORMER_CONFIG = {
    "_class_name": "QwenImageTransformer2DModel",
    "_diffusers_version": "0.35.0.dev0",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 3584,
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
}
"""Qwen/Qwen-Image's transformer/config.json."""


def test_stored_fingerprints_are_the_recomputed_ones() -> None:
    computed = released_fingerprints()
    assert difforge_qwen_image.DIT_FINGERPRINTS == {fp: v for (m, v), fp in computed.items() if m == "qwen-image-dit"}


def test_registered(qwen_registry) -> None:
    dit = qwen_registry.models.get("qwen-image-dit")
    assert (dit.family, dit.role, dit.format) == ("qwen-image", "dit", "diffusers")
    assert dit.infer_config(released_shapes("qwen-image-dit", "Qwen-Image")) == QWEN_IMAGE
    pipe = qwen_registry.pipelines.get("qwen-image")
    assert {s.name: s.models for s in pipe.slots} == {
        "dit": ("qwen-image-dit",), "vae": ("wan-vae",), "text_encoder": ("qwen2.5-vl-text",), "tokenizer": ("qwen2-tokenizer",),
    }  # fmt: skip
    for slot in pipe.slots:
        for model in slot.models:
            qwen_registry.models.get(model)  # every slot's model is registered (by this plugin or its dependencies)
    assert pipe.default_scheduler["shift_terminal"] == 0.02 and pipe.default_scheduler["max_image_seq_len"] == 8192


def test_scheduler_is_the_released_scheduler_config(qwen_registry) -> None:
    """Qwen/Qwen-Image's scheduler/scheduler_config.json translates to the pipeline's default."""
    from difforge.runtime.assembly import translate_scheduler_config

    released = {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
        "invert_sigmas": False, "max_image_seq_len": 8192, "max_shift": 0.9, "num_train_timesteps": 1000,
        "shift": 1.0, "shift_terminal": 0.02, "stochastic_sampling": False, "time_shift_type": "exponential",
        "use_beta_sigmas": False, "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
    }  # fmt: skip
    assert translate_scheduler_config(released) == difforge_qwen_image.QWEN_IMAGE_SCHEDULER
    difforge.build_scheduler(difforge_qwen_image.QWEN_IMAGE_SCHEDULER, family="qwen-image")


def test_entry_module_is_light() -> None:
    code = "import sys, difforge_qwen_image; list(difforge_qwen_image.difforge_register_models()); "
    code += "list(difforge_qwen_image.difforge_register_converters()) if hasattr(difforge_qwen_image, "
    code += "'difforge_register_converters') else None; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- real-size headers


def test_detect_transformer_folder(tmp_path, sharded_sparse_writer) -> None:
    """The released transformer/: 9 shards with their index and config.json, fingerprinted as a union."""
    shapes = released_shapes("qwen-image-dit", "Qwen-Image")
    folder = sharded_sparse_writer(tmp_path / "transformer", shapes, shards=9, config=TRANSFORMER_CONFIG)
    result = difforge.detect(folder)
    assert (result.model, result.family, result.format, result.variant) == ("qwen-image-dit", "qwen-image", "diffusers", "Qwen-Image")
    assert result.config == QWEN_IMAGE and result.converter is None and len(result.paths) == 9
    shard = sorted(folder.glob("*.safetensors"))[3]
    with pytest.raises(difforge.DifforgeError):
        difforge.detect(shard)  # one shard alone is not the model: the index names the other eight


@pytest.mark.parametrize("dtype", ["BF16", "F8_E4M3"])
def test_detect_comfyui_single_file(tmp_path, sparse_writer, dtype) -> None:
    """ComfyUI's qwen_image_bf16 / qwen_image_fp8_e4m3fn: the same keys behind model.diffusion_model."""
    shapes = {"model.diffusion_model." + k: v for k, v in released_shapes("qwen-image-dit", "Qwen-Image").items()}
    result = difforge.detect(sparse_writer(tmp_path / "qwen_image.safetensors", shapes, dtype=dtype))
    assert (result.model, result.variant, result.prefix) == ("qwen-image-dit", "Qwen-Image", "model.diffusion_model.")
    assert result.config == QWEN_IMAGE


def test_detect_pruned_fine_tune(tmp_path, sparse_writer) -> None:
    """Not a release (fewer blocks): structural detection, no variant, the config inferred."""
    shapes = {k: v for k, v in released_shapes("qwen-image-dit", "Qwen-Image").items()
              if not k.startswith("transformer_blocks.59.")}  # fmt: skip
    result = difforge.detect(sparse_writer(tmp_path / "pruned.safetensors", shapes))
    assert (result.model, result.variant) == ("qwen-image-dit", None)
    assert result.config.num_layers == 59
