"""The SD 1.x and SDXL pipelines: only what is the family's own (prompt encoding, the U-Net call with
the scheduler's input scaling, SDXL's size conditioning, the VAE's latent scale).

Prompt handling follows diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` to
the token: prompts padded to 77 tokens; SD 1.x conditions on CLIP-L's last hidden state (after the
final layer norm); SDXL on the penultimate hidden states of CLIP-L and CLIP-G concatenated, with
CLIP-G's projected pooled output as ``text_embeds``; with no negative prompt, SDXL's unconditional
embeddings are zeros (``force_zeros_for_empty_prompt``), SD 1.x encodes ``""``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from difforge import ConfigError, Pipeline

__all__ = ["SDPipeline", "SDXLPipeline", "SCALING_FACTORS"]

SCALING_FACTORS = {"sd": 0.18215, "sdxl": 0.13025}
"""The latent scale of each family's VAE (not in the weights: the released configs say so)."""


_DIFFUSERS_SCHEDULERS = {
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "ddim",  # SD 1.5's release; difforge has no PNDM: DDIM on the same betas
    "EulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpmpp-2m",
}


def _expand(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.expand(b, *t.shape[1:]) if t.shape[0] != b else t


class SDPipeline(Pipeline):
    """Stable Diffusion 1.x text-to-image and image-to-image.

    ``clip_skip``: condition on the output of CLIP's layer ``clip_skip`` before the last (through the
    final layer norm), as diffusers' ``clip_skip``, which leaves the negative prompt's encoding as it is.

    The scheduler's ``init_noise_sigma`` scales fresh noise and ``scale_model_input`` the U-Net's
    input, as in diffusers' loop; the U-Net predicts epsilon or v as the scheduler's
    ``prediction_type`` option says.
    """

    spatial_multiple = 8
    defaults: Mapping[str, Any] = {
        "num_inference_steps": 50, "height": 512, "width": 512, "cfg_scale": 7.5, "clip_skip": None,
    }

    @classmethod
    def translate_scheduler_config(cls, config: Mapping[str, Any], source: str = "scheduler_config.json") -> dict[str, Any]:
        """diffusers' DDIM / Euler / DPM++ 2M (and PNDM, which runs as DDIM on the same betas) configs ->
        ``ddim`` / ``euler`` / ``dpmpp-2m`` with every option of the config the scheduler declares."""
        name = _DIFFUSERS_SCHEDULERS.get(config.get("_class_name", ""))
        if name is None:
            return super().translate_scheduler_config(config, source=source)
        from ._scheduler_specs import options_from_diffusers

        # missing keys take diffusers' class defaults (not ours), and settings we would sample differently
        # (solver_order 3, thresholding, ...) are refused instead of silently ignored
        return {"name": name, **options_from_diffusers(name, config, source)}

    @property
    def scaling_factor(self) -> float:
        return SCALING_FACTORS[self.spec.family]

    # -- prompts

    def _tokens(self, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        ids, _ = tokenizer(list(prompts), max_length=tokenizer.model_max_length or 77, padding="max_length")
        return ids.to(self.device)

    def check_call(self, kw: dict[str, Any]) -> None:
        skip = kw.get("clip_skip")
        if skip is not None and (not isinstance(skip, int) or isinstance(skip, bool) or skip < 0):
            raise ConfigError(f"clip_skip must be a non-negative integer (layers of CLIP to skip), got {skip!r}")

    def encode_negative_prompt(
        self, negative_prompt: Sequence[str] | None, cond: Mapping[str, torch.Tensor], batch: int, **kw: Any
    ) -> dict[str, torch.Tensor]:
        # diffusers applies clip_skip to the prompt only; the negative prompt uses the usual layer
        return super().encode_negative_prompt(negative_prompt, cond, batch, **{**kw, "clip_skip": None})

    def encode_prompt(self, prompt: Sequence[str], clip_skip: int | None = None, **kw: Any) -> dict[str, torch.Tensor]:
        out = self.text_encoder(self._tokens(self.tokenizer, prompt), output_hidden_states=bool(clip_skip))
        if clip_skip:  # diffusers: the output of an earlier layer, through the final layer norm
            hidden = self.text_encoder.text_model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
        else:
            hidden = out.last_hidden_state
        return {"encoder_hidden_states": hidden.to(self.torch_dtype)}

    # -- latents

    def latent_shape(self, batch: int, height: int, width: int, **kw: Any) -> tuple[int, ...]:
        return (batch, self.unet.config.in_channels, height // 8, width // 8)

    def prepare_latents(self, latents: torch.Tensor, kw: Mapping[str, Any], extra: Mapping[str, Any]) -> torch.Tensor:
        if kw.get("input_image") is not None:  # add_noise already mixed source and noise
            return latents
        return latents * self.scheduler.init_noise_sigma

    def step_index(self, timestep: torch.Tensor) -> int:
        """The scheduler step whose timestep this is (the runtime's loop passes ``timesteps[i]``)."""
        ts = torch.as_tensor(self.scheduler.timesteps).float().cpu()
        return int((ts - float(timestep)).abs().argmin())

    def unet_inputs(self, latents: torch.Tensor, cond: Mapping[str, torch.Tensor], **kw: Any) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": _expand(cond["encoder_hidden_states"], latents.shape[0])}

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor], **kw: Any) -> torch.Tensor:
        x = self.scheduler.scale_model_input(latents, self.step_index(timestep))
        t = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(latents.shape[0])
        return self.unet(x.to(self.torch_dtype), t, **self.unet_inputs(latents, cond, **kw))

    # -- images

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image) * self.scaling_factor

    def decode(self, latents: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor)


class SDXLPipeline(SDPipeline):
    """SDXL text-to-image and image-to-image, with size micro-conditioning.

    Call arguments beyond the runtime's: ``original_size`` and ``target_size`` (``(height, width)``,
    default the output size) and ``crops_coords_top_left`` (default ``(0, 0)``), as in diffusers.
    """

    defaults: Mapping[str, Any] = {
        "num_inference_steps": 50, "height": 1024, "width": 1024, "cfg_scale": 5.0, "clip_skip": None,
        "original_size": None, "target_size": None, "crops_coords_top_left": (0, 0),
    }

    def check_call(self, kw: dict[str, Any]) -> None:
        super().check_call(kw)
        for name in ("original_size", "target_size", "crops_coords_top_left"):
            value = kw.get(name)
            if value is not None and (not isinstance(value, (tuple, list)) or len(value) != 2):
                raise ConfigError(f"{name} must be a pair (height, width) / (top, left), got {value!r}")

    def encode_prompt(self, prompt: Sequence[str], clip_skip: int | None = None, **kw: Any) -> dict[str, torch.Tensor]:
        first = self.text_encoder(self._tokens(self.tokenizer, prompt), output_hidden_states=True)
        second = self.text_encoder_2(self._tokens(self.tokenizer_2, prompt), output_hidden_states=True)
        layer = -((clip_skip or 0) + 2)  # the penultimate layer, or clip_skip layers before it (no final norm)
        hidden = torch.cat([first.hidden_states[layer], second.hidden_states[layer]], dim=-1)
        pooled = self.text_encoder_2.project(second.pooled_output)
        return {"encoder_hidden_states": hidden.to(self.torch_dtype), "text_embeds": pooled.to(self.torch_dtype)}

    def encode_negative_prompt(
        self, negative_prompt: Sequence[str] | None, cond: Mapping[str, torch.Tensor], batch: int, **kw: Any
    ) -> dict[str, torch.Tensor]:
        if negative_prompt is None:  # force_zeros_for_empty_prompt, as the released SDXL config sets
            return {k: torch.zeros_like(v) for k, v in cond.items()}
        return super().encode_negative_prompt(negative_prompt, cond, batch, **kw)

    def unet_inputs(self, latents: torch.Tensor, cond: Mapping[str, torch.Tensor], **kw: Any) -> dict[str, torch.Tensor]:
        b, size = latents.shape[0], (latents.shape[-2] * 8, latents.shape[-1] * 8)
        ids = [*(kw.get("original_size") or size), *(kw.get("crops_coords_top_left") or (0, 0)), *(kw.get("target_size") or size)]
        return {
            "encoder_hidden_states": _expand(cond["encoder_hidden_states"], b),
            "text_embeds": _expand(cond["text_embeds"], b),
            "time_ids": torch.tensor([ids], dtype=self.torch_dtype, device=latents.device).expand(b, -1),
        }
