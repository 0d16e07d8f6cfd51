"""The Wan pipeline: text-to-video, video-to-video, and image-to-video with Wan2.2 TI2V-5B.

Only what is Wan's own lives here; the loop, CFG, seeds and outputs are the runtime's:

- prompts are cleaned (HTML entities, whitespace) and encoded by umT5 with the padding mask, the
  valid tokens kept and zero-padded to ``max_sequence_length`` (512), as diffusers' ``WanPipeline``
  and Wan-AI's code do;
- ``num_frames`` must be ``4k + 1``; the latent has ``k + 1`` frames;
- video-to-video (``input_video`` + ``denoising_strength``): the video's latents are noised to the
  first step that runs (:meth:`WanPipeline.encode_source`);
- image-to-video (``input_image``, TI2V-5B): the image's latent is the first latent frame; its
  tokens get timestep 0 and it is put back after every step (:meth:`prepare_latents`,
  :meth:`after_step`), which is what diffusers' ``WanImageToVideoPipeline`` with
  ``expand_timesteps`` computes. The runtime's image-to-image use of ``input_image`` is not used.

Output: a list of PIL frames (a list of such lists for a batch); ``difforge.save_video`` writes them.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from difforge import ConfigError, Pipeline
from difforge.runtime.images import preprocess_image


def prompt_clean(text: str) -> str:
    """Wan's prompt cleaning: HTML entities unescaped (twice), whitespace runs collapsed, ends stripped."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def preprocess_video(video: Any, height: int, width: int) -> torch.Tensor:
    """A video (list of PIL images / paths / ``[H, W, 3]`` arrays in [0, 1], an ``[F, H, W, 3]`` array, or a
    ``[3, F, H, W]`` / ``[1, 3, F, H, W]`` tensor in [-1, 1]) -> float32 ``[1, 3, F, height, width]`` in [-1, 1]."""
    if isinstance(video, torch.Tensor):
        t = video.float()
        t = t[None] if t.dim() == 4 else t
        if t.dim() != 5 or t.shape[:2] != (1, 3):
            raise ConfigError(f"input_video tensor must be [3, F, H, W] or [1, 3, F, H, W] in [-1, 1], got {tuple(video.shape)}")
        frames = [preprocess_image(t[:, :, i], height, width) for i in range(t.shape[2])]
    elif isinstance(video, (str, os.PathLike)):
        raise ConfigError("input_video: pass the frames (a list of PIL images or an array), not a file path")
    else:
        frames = [preprocess_image(frame, height, width) for frame in video]
    if not frames:
        raise ConfigError("input_video has no frames")
    return torch.stack(frames, dim=2)


class WanPipeline(Pipeline):
    """Wan2.1 T2V (1.3B, 14B) and Wan2.2 TI2V-5B.

    Call arguments beyond the runtime's: ``num_frames`` (``4k + 1``; default 81, 121 for TI2V-5B, or the
    length of ``input_video``), ``input_video`` (video-to-video with ``denoising_strength``),
    ``input_image`` (first frame, TI2V-5B), ``max_sequence_length`` (umT5 tokens, 512), ``tiled`` /
    ``tile_size`` / ``tile_stride`` (spatial VAE tiles, latent pixels), ``vae_time_chunk`` (latent frames
    decoded at a time; memory grows with it).
    """

    call_arguments = frozenset({"input_video"})

    def set_scheduler(self, scheduler: Any = None, *, _folder: Mapping[str, Any] | None = None) -> None:
        """As the runtime's, but ``flow-euler`` gets Wan's defaults unless given: diffusers' step spacing
        (``spacing="sd3"``, what ``FlowMatchEulerDiscreteScheduler.set_timesteps(n)`` makes for
        ``WanPipeline``) and the detected release's shift."""
        from difforge.plugins import get_registry
        from difforge.runtime.options import parse_choice

        choice = parse_choice(scheduler, "scheduler") or parse_choice(_folder, "scheduler")
        if choice is not None and get_registry().schedulers.get(choice.name).name == "flow-euler":
            shift = dict(self.spec.variant_schedulers.get(self.variant or "", {})).get("shift")
            wan = {"spacing": "sd3", "shift": shift or (5.0 if self.image_to_video else 3.0)}
            super().set_scheduler({"name": choice.name, **wan, **choice.options})
            return
        super().set_scheduler(scheduler, _folder=_folder)

    @property
    def image_to_video(self) -> bool:
        """Whether the model takes a first-frame condition (the TI2V design: the Wan 2.2 VAE)."""
        return bool(self.vae.config.residual)

    @property
    def spatial_multiple(self) -> int:  # type: ignore[override]
        return self.vae.spatial_ratio * self.dit.config.patch_size[1]

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        ti2v = self.image_to_video
        return {
            "num_inference_steps": 50,
            "height": 704 if ti2v else 480,
            "width": 1280 if ti2v else 832,
            "num_frames": None,  # 121 (TI2V) or 81, or the input video's length: see check_call
            "cfg_scale": 5.0,
            "max_sequence_length": 512,
            "tiled": False,
            "tile_size": 32,
            "tile_stride": 24,
            "vae_time_chunk": 1,
        }

    def check_call(self, kw: dict[str, Any]) -> None:
        r = self.vae.temporal_ratio
        video, image, latents = kw.get("input_video"), kw.get("input_image"), kw.get("latents")
        if video is not None and image is not None:
            raise ConfigError("give input_video (video-to-video) or input_image (image-to-video), not both")
        if image is not None:
            if not self.image_to_video:
                raise ConfigError(
                    "input_image: this Wan model takes no first-frame condition; image-to-video needs an image-to-video "
                    "model (Wan2.2-TI2V-5B). For video-to-video pass input_video="
                )
            if float(kw.get("denoising_strength", 1.0)) < 1.0:
                raise ConfigError("denoising_strength applies to input_video; image-to-video starts from noise")
        if kw.get("num_frames") is None:
            if latents is not None:
                kw["num_frames"] = (latents.shape[2] - 1) * r + 1
            elif video is not None:
                kw["num_frames"] = len(video) if not isinstance(video, torch.Tensor) else video.shape[-3]
            else:
                kw["num_frames"] = 121 if self.image_to_video else 81
        frames = kw["num_frames"]
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1 or (frames - 1) % r:
            raise ConfigError(f"num_frames must be {r}k + 1 (1, 5, ..., 81, ...), got {frames!r}")
        if video is not None:
            available = len(video) if not isinstance(video, torch.Tensor) else video.shape[-3]
            if available < frames:
                raise ConfigError(f"input_video has {available} frames, fewer than num_frames={frames}")
        if not 0 < int(kw.get("max_sequence_length", 512)) <= 512:
            raise ConfigError(f"max_sequence_length must be in 1..512, got {kw.get('max_sequence_length')}")
        if kw.get("tiled") and not (0 < int(kw["tile_stride"]) <= int(kw["tile_size"])):
            raise ConfigError(f"tile_stride must be in (0, tile_size], got {kw['tile_stride']} and {kw['tile_size']}")
        if int(kw.get("vae_time_chunk", 1)) < 1:
            raise ConfigError(f"vae_time_chunk must be a positive number of latent frames, got {kw['vae_time_chunk']}")

    # -- the family's part

    def encode_prompt(self, prompt: Sequence[str], max_sequence_length: int = 512, **kw: Any) -> dict[str, torch.Tensor]:
        from difforge_text_encoders.prompts import masked_embeddings

        context, _ = masked_embeddings(
            self.tokenizer, self.text_encoder, [prompt_clean(p) for p in prompt], max_length=max_sequence_length,
            padding="max_length", pad_to=max_sequence_length, device=self.device,
        )  # fmt: skip
        return {"context": context.to(self.torch_dtype)}

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int = 81, **kw: Any) -> tuple[int, ...]:
        s = self.vae.spatial_ratio
        return (batch, self.vae.config.z_dim, (num_frames - 1) // self.vae.temporal_ratio + 1, height // s, width // s)

    def size_from_latents(self, latents: torch.Tensor) -> tuple[int, int]:
        s = self.vae.spatial_ratio
        return latents.shape[-2] * s, latents.shape[-1] * s

    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        first_frame: torch.Tensor | None = None,
        **kw: Any,
    ) -> torch.Tensor:
        b, _, f, h, w = latents.shape
        context = cond["context"]
        context = context.expand(b, -1, -1) if context.shape[0] != b else context
        t = timestep.expand(b)
        if first_frame is not None:  # the conditioning frame's tokens are clean: timestep 0
            _, ph, pw = self.dit.config.patch_size
            per_frame = (h // ph) * (w // pw)
            t = t[:, None].repeat(1, f * per_frame)
            t[:, :per_frame] = 0
        return self.dit(latents, t, context)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image)

    def encode_source(self, kw: Mapping[str, Any], extra: Mapping[str, Any]) -> torch.Tensor | None:
        """The latents of ``input_video`` (its first ``num_frames`` frames); ``input_image`` is no source here."""
        if kw.get("input_video") is None:
            return None
        video = preprocess_video(kw["input_video"], kw["height"], kw["width"])[:, :, : kw["num_frames"]]
        return self.vae.encode(video.to(self.device, self.torch_dtype))

    def prepare_latents(self, latents: torch.Tensor, kw: Mapping[str, Any], extra: dict[str, Any]) -> torch.Tensor:  # type: ignore[override]
        """Image-to-video: encode ``input_image`` as the first latent frame; kept in ``extra["first_frame"]``
        for :meth:`predict` and :meth:`after_step`."""
        if kw.get("input_image") is None:
            return latents
        image = preprocess_image(kw["input_image"], kw["height"], kw["width"])
        first = self.vae.encode(image[:, :, None].to(self.device, self.torch_dtype))
        if first.shape[0] not in (1, latents.shape[0]):
            raise ConfigError(f"input_image: {first.shape[0]} images for a batch of {latents.shape[0]}")
        extra["first_frame"] = first.expand(latents.shape[0], -1, -1, -1, -1)
        return self.after_step(latents, -1, extra)

    def after_step(self, latents: torch.Tensor, step: int, extra: Mapping[str, Any]) -> torch.Tensor:
        first = extra.get("first_frame")
        if first is None:
            return latents
        return torch.cat([first.to(latents.dtype), latents[:, :, 1:]], dim=2)

    def decode(
        self,
        latents: torch.Tensor,
        tiled: bool = False,
        tile_size: int = 32,
        tile_stride: int = 24,
        vae_time_chunk: int = 1,
        **kw: Any,
    ) -> torch.Tensor:
        if tiled:
            return self.vae.tiled_decode(latents, int(tile_size), int(tile_stride), int(vae_time_chunk))
        return self.vae.decode(latents, int(vae_time_chunk))
