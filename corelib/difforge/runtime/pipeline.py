"""``difforge.Pipeline``: assembly from plugin names and the shared denoising runtime.

A family plugin subclasses :class:`Pipeline` and writes only what is its own:

- ``encode_prompt(prompt) -> dict`` of conditioning tensors (``prompt_embeds=`` skips it);
- ``latent_shape(batch, height, width, **kw)`` of the initial noise, in the model's latent layout
  before patchifying (``[B, C, H/8, W/8]`` or ``[B, C, F, H/8, W/8]``);
- ``predict(latents, timestep, cond, **kw)``: the model's flow-velocity prediction;
- ``encode_image(image_tensor) -> latents`` and ``decode(latents) -> image tensor in [-1, 1]``;
- optionally ``image_seq_len(latent_shape)`` (resolution-dependent shift), ``check_call(kwargs)``.

The runtime owns everything else: argument checks before heavy work, seeds and ``rand_device``,
``latents=``/``prompt_embeds=`` passthrough, img2img, classifier-free guidance (with separate cache
state per branch), the scheduler loop, the step callback, ``tqdm`` progress, ``output_type``, and
the removable offload / cache / attention wrappers applied in DESIGN.md's fixed order.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._names import normalize_name, resolve
from .. import parallel as _parallel
from ..errors import ConfigError
from ..ops.attention import use_attention
from ..plugins import get_plugin_manager, get_registry
from ..specs import PipelineSpec
from . import assembly
from .images import postprocess, preprocess_image
from .options import PluginChoice, merge_options, parse_choice, parse_choices

log = logging.getLogger(__name__)

__all__ = ["DENOISER_ROLES", "Pipeline", "current_cfg_branch"]

DENOISER_ROLES = frozenset({"dit", "unet", "denoiser"})
"""``ModelSpec.role`` values of a pipeline's denoiser: the model the step loop runs (caches apply to
it; its fingerprint names the release). A DiT is ``dit``, a U-Net ``unet``."""

_branch: contextvars.ContextVar[str] = contextvars.ContextVar("difforge_cfg_branch", default="cond")

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

#: call arguments the runtime itself consumes; every other one is passed to the family's methods
RUNTIME_ARGUMENTS = frozenset(
    {
        "prompt", "negative_prompt", "cfg_scale", "height", "width", "num_inference_steps", "seed",
        "rand_device", "latents", "prompt_embeds", "negative_prompt_embeds", "input_image",
        "denoising_strength", "output_type", "callback", "progress_bar_cmd",
    }
)


def current_cfg_branch() -> str:
    """``"cond"`` or ``"uncond"``: the classifier-free-guidance branch being computed.

    Cache strategies keep separate state per branch by reading this.
    """
    return _branch.get()


@contextlib.contextmanager
def cfg_branch(name: str) -> Iterator[None]:
    token = _branch.set(name)
    try:
        yield
    finally:
        _branch.reset(token)


def _default_progress(iterable: Iterable[Any], **kw: Any) -> Iterable[Any]:
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


class Pipeline:
    """A family pipeline: components, a scheduler and the options applied to them.

    Build one with :meth:`from_pretrained` or :meth:`from_recipe`; call it to generate.
    """

    #: height and width must be multiples of this (family pipelines override)
    spatial_multiple: int = 16
    #: call defaults of the family (``num_inference_steps``, ``height``, ``width``, ``cfg_scale``, ...)
    defaults: Mapping[str, Any] = {"num_inference_steps": 28, "height": 1024, "width": 1024, "cfg_scale": 1.0}
    #: family call arguments without a default (``input_video``, ...), besides those in ``defaults``
    call_arguments: frozenset[str] = frozenset()
    #: this process's place in a parallel launch (:mod:`difforge.parallel`); None in a single process
    parallel_state: Any = None

    def __init__(
        self,
        spec: PipelineSpec,
        components: Mapping[str, Any],
        *,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype = torch.float32,
        detections: Mapping[str, Any] | None = None,
    ) -> None:
        self.spec = spec
        self.components: dict[str, Any] = dict(components)
        self.detections: dict[str, Any] = dict(detections or {})
        self.device = torch.device(device)
        self.torch_dtype = torch_dtype
        self.scheduler: Any = None
        self.scheduler_choice: PluginChoice | None = None
        self.attention: str | None = None
        self.cache_choice: PluginChoice | None = None
        self.offload_choices: list[PluginChoice] = []
        self._cache_handles: list[Any] = []
        self._offload_handles: list[Any] = []

    # ------------------------------------------------------------ components

    def __getattr__(self, name: str) -> Any:
        components = self.__dict__.get("components")
        if components is not None and name in components:
            return components[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or component {name!r}")

    @property
    def variant(self) -> str | None:
        """The release the denoiser (a :data:`DENOISER_ROLES` role) matched by fingerprint; None for fine-tunes.

        Encoders and VAEs are shared between releases (FLUX.1-dev and -schnell ship the same T5),
        so only the denoiser says which release this is.
        """
        slots = self.denoiser_slots()
        return getattr(self.detections.get(slots[0]), "variant", None) if slots else None

    def denoiser_slots(self) -> list[str]:
        """The component slots whose model is a denoiser (a :data:`DENOISER_ROLES` role: the model the
        step loop runs), in component order: ``["dit"]`` for the DiT families, ``["unet"]`` for a U-Net."""
        return [
            slot for slot in self.components
            if (spec := self._model_spec(slot)) is not None and spec.role in DENOISER_ROLES
        ]  # fmt: skip

    def models(self) -> dict[str, torch.nn.Module]:
        return {k: v for k, v in self.components.items() if isinstance(v, torch.nn.Module)}

    # ------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        model_configs: Any = None,
        tokenizer_config: Any = None,
        *,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        attention: str | Mapping[str, Any] | None = None,
        cache: str | Mapping[str, Any] | None = None,
        offload: Any = None,
        scheduler: str | Mapping[str, Any] | None = None,
        parallelism: int | None = None,
        cfg_parallel: int | None = None,
        ulysses_degree: int | None = None,
        ring_degree: int | None = None,
    ) -> Pipeline:
        """Assemble pipeline ``name`` from checkpoint files, in any order.

        ``model_configs``: a list of ``ModelConfig`` (or paths), a diffusers-layout folder
        (``model_index.json`` + component subfolders), or None for the pipeline's default sources.
        Every file is detected from its header and routed to its slot; a missing required
        component, an unknown plugin name or a bad option fails before any weights are read.

        ``parallelism`` (= ``cfg_parallel * ulysses_degree * ring_degree``): run on that many processes,
        see :mod:`difforge.parallel`; in a plain process this returns a ``ParallelPipeline`` that owns
        the workers, under ``torchrun`` a Pipeline of this rank.
        """
        given = dict(model_configs=model_configs, tokenizer_config=tokenizer_config, torch_dtype=torch_dtype,
                     attention=attention, cache=cache, offload=offload, scheduler=scheduler)  # fmt: skip
        registry = get_registry()
        spec = registry.pipelines.get(name)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = torch_dtype or torch.float32
        scheduler_choice = parse_choice(scheduler, "scheduler")
        attention_choice = parse_choice(attention, "attention")
        cache_choice = parse_choice(cache, "cache")
        offload_choices = parse_choices(offload, "offload")
        _check_names(registry, spec, scheduler_choice, attention_choice, cache_choice, offload_choices)

        folder_scheduler = None
        if (
            isinstance(model_configs, (list, tuple))
            and len(model_configs) == 1
            and isinstance(model_configs[0], (str, os.PathLike))
            and assembly.is_diffusers_folder(model_configs[0])
        ):  # [folder], as the CLI's --model gives it
            model_configs = model_configs[0]
        if model_configs is None:
            configs = assembly.source_configs(spec)
        elif isinstance(model_configs, (str, os.PathLike)) and assembly.is_diffusers_folder(model_configs):
            configs = assembly.diffusers_folder_configs(spec, str(model_configs))
            folder_scheduler = assembly.scheduler_from_diffusers(
                str(model_configs), translate=resolve(spec.pipeline).translate_scheduler_config
            )
            if tokenizer_config is None:
                tokenizer_config = [
                    str(Path(model_configs) / s.diffusers_subfolder)
                    for s in spec.slots
                    if s.kind == "tokenizer" and s.diffusers_subfolder and (Path(model_configs) / s.diffusers_subfolder).is_dir()
                ]
        else:
            items = [model_configs] if isinstance(model_configs, (str, os.PathLike)) else list(model_configs)
            configs = []
            for item in items:
                mc = assembly.as_model_config(item)
                if getattr(mc, "model_id", None) and not getattr(mc, "origin_file_pattern", None) and not getattr(mc, "path", None):
                    expanded = assembly.source_configs(spec, mc.model_id)
                    configs.extend(expanded or [mc])
                else:
                    configs.append(mc)
        tokenizers = [] if tokenizer_config is None else (
            [tokenizer_config] if not isinstance(tokenizer_config, (list, tuple)) else list(tokenizer_config)
        )
        tokenizers = [assembly.as_model_config(t) for t in tokenizers]
        routed = assembly.route(registry, spec, configs, tokenizers)
        layout = _parallel.plan_layout(
            parallelism, cfg_parallel, ulysses_degree, ring_degree, pipeline=spec.name,
            uses_cfg=_parallel.default_uses_cfg(resolve(spec.pipeline)),
        )
        parallel_state = None
        if layout is not None:  # every check before weights are read, then spawn workers or join torchrun
            joined = _parallel.launched_by_torchrun()
            _parallel.check_devices(layout, device, world_size_hint=1 if joined else None)
            for comp in routed.values():
                if comp.spec.role in DENOISER_ROLES:
                    config = getattr(comp.detection, "config", None)
                    _parallel.check_denoiser(layout, comp.spec.name, resolve(comp.spec.module), config)
            if not joined:
                return _parallel.ParallelPipeline(spec.name, layout, device, given)
            parallel_state = _parallel.join_launch(layout, device)
            device = parallel_state.device

        # every slot is known: now load weights
        from ..loading.load import load_model

        from ..builtin.offload import located_slots, offload_from_model_configs

        offload_choices = offload_from_model_configs(  # ModelConfig offload_device/offload_dtype -> backends
            registry, {s: c.model_config for s, c in routed.items() if c.spec.role != "tokenizer"}, offload_choices,
            device=device, torch_dtype=torch_dtype,
        )
        located = located_slots(registry, offload_choices, routed)  # loaded on the CPU, the backend moves them
        components: dict[str, Any] = {}
        detections: dict[str, Any] = {}
        for slot_name, comp in routed.items():
            if comp.spec.role == "tokenizer":
                components[slot_name] = resolve(comp.spec.module).from_folder(comp.paths[0], comp.detection)
            else:
                components[slot_name] = load_model(
                    comp.paths, torch_dtype=torch_dtype, device=torch.device("cpu") if slot_name in located else device,
                    detection=comp.detection,
                    model=comp.spec.name,
                )
            detections[slot_name] = comp.detection
        pipeline_cls = resolve(spec.pipeline)
        pipe: Pipeline = pipeline_cls(spec, components, device=device, torch_dtype=torch_dtype, detections=detections)
        if parallel_state is not None:
            _parallel.attach(pipe, parallel_state)
        pipe.set_scheduler(scheduler_choice.as_arg() if scheduler_choice else None, _folder=folder_scheduler)
        pipe._apply_offload(offload_choices)
        pipe.set_cache(cache_choice.as_arg() if cache_choice else None)
        pipe.set_attention(attention_choice.as_arg() if attention_choice else None)
        get_plugin_manager().hook.difforge_pipeline_built(pipeline=pipe)
        log.info("assembled %s: %s", spec.name, ", ".join(f"{k}={type(v).__name__}" for k, v in components.items()))
        return pipe

    @classmethod
    def from_recipe(cls, recipe: Any) -> Pipeline:
        """Build from a TOML recipe path (or a loaded :class:`~difforge.runtime.recipe.Recipe`).

        Its ``[defaults]`` become this pipeline's call defaults.
        """
        from .recipe import Recipe, load_recipe

        r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        pipe = cls.from_pretrained(r.name, **r.pretrained_kwargs())
        pipe.call_defaults = dict(r.defaults)
        return pipe

    @classmethod
    def translate_scheduler_config(cls, config: Mapping[str, Any], source: str = "scheduler_config.json") -> dict[str, Any]:
        """A diffusers folder's ``scheduler_config.json`` -> ``{"name": ..., **options}``. The default knows
        the flow-matching samplers; families whose releases ship others (DDIM, Euler) override it."""
        return assembly.translate_scheduler_config(config, source=source)

    # ------------------------------------------------------------ plugin options after build

    def set_scheduler(self, scheduler: str | Mapping[str, Any] | None = None, *, _folder: Mapping[str, Any] | None = None) -> None:
        """Choose the sampler: a name/dict, else the detected release's, else the pipeline default."""
        from ..schedulers import build_scheduler

        choice = parse_choice(scheduler, "scheduler")
        if choice is None:
            default = _folder or self.spec.variant_schedulers.get(self.variant or "", None) or self.spec.default_scheduler
            choice = parse_choice(default, "scheduler")
        self.scheduler = build_scheduler(choice.as_arg(), family=self.spec.family)
        self.scheduler_choice = choice

    def _apply_offload(self, choices: list[PluginChoice]) -> None:
        registry = get_registry()
        specs = [(registry.offload.get(c.name), c) for c in choices]
        self.offload_choices = list(choices)  # set first: a backend may adapt to those applied after it (fp8 + disk)
        for off, choice in sorted(specs, key=lambda sc: 0 if sc[0].kind == "dtype" else 1):  # dtype, then location
            options = merge_options("offload backend", off.name, off.options, choice.options)
            self._offload_handles.append(resolve(off.apply)(self, options))

    def set_offload(self, offload: Any) -> None:
        """Replace the offload backends (``None`` or ``[]`` removes them all).

        The cache is taken off and put back around the change, so the order stays the fixed one:
        dtype backends, location backends, cache, attention.
        """
        choices = parse_choices(offload, "offload")
        registry = get_registry()
        for choice in choices:
            o = registry.offload.get(choice.name)
            merge_options("offload backend", o.name, o.options, choice.options)
        from ..lora.manager import offload_change

        cache = self.cache_choice
        self.set_cache(None)
        with offload_change(self):  # fused LoRAs leave the weights while the backends change (then fused or hot)
            for handle in reversed(self._offload_handles):
                handle.remove()
            self._offload_handles = []
            self.offload_choices = []
            self._apply_offload(choices)
        self.set_cache(cache.as_arg() if cache else None)

    def set_cache(self, cache: str | Mapping[str, Any] | None) -> None:
        """Apply a cache strategy to every component with a block layout (None removes it)."""
        for handle in reversed(self._cache_handles):
            handle.remove()
        self._cache_handles = []
        self.cache_choice = None
        choice = parse_choice(cache, "cache")
        if choice is None:
            return
        registry = get_registry()
        cache_spec = registry.caches.get(choice.name)
        options = merge_options("cache strategy", cache_spec.name, cache_spec.options, choice.options)
        apply = resolve(cache_spec.apply)
        # the denoiser only: encoders run once per call, outside the step loop and its CFG branches
        for slot in self.denoiser_slots():
            spec = self._model_spec(slot)
            if spec.layout is not None:
                self._cache_handles.append(apply(self.components[slot], spec.layout, {**options, "family": self.spec.family}))
        if not self._cache_handles:
            raise ConfigError(f"cache {choice.name!r}: no denoiser of pipeline {self.spec.name!r} declares a block layout")
        self.cache_choice = choice

    def set_attention(self, attention: str | Mapping[str, Any] | None) -> None:
        """Use attention backend ``attention`` for this pipeline's calls (None: the process default)."""
        choice = parse_choice(attention, "attention")
        if choice is not None and normalize_name(choice.name) != "auto":
            get_registry().attention.get(choice.name)  # unknown names fail now
            if choice.options:
                raise ConfigError(f"attention {choice.name!r}: attention backends take no options")
        self.attention = None if choice is None else choice.name

    def cache_stats(self) -> list[Any]:
        return [h.stats() for h in self._cache_handles]

    # ------------------------------------------------------------ LoRA (difforge.lora)

    def load_lora(self, lora: Any, scale: float = 1.0, fuse: bool | None = None, target: Any = "dit",
                  name: str | None = None, strict: bool = True, scheduler: Any = None) -> str:
        """Load a LoRA (path, ``ModelConfig`` or state dict) in any registered format; returns its name.
        ``target``: component slot(s), ``"all"``, or ``"dit"`` (the default), which names the denoiser
        whatever its slot is called (a U-Net pipeline's ``unet``). ``fuse=None`` fuses unless an offload
        backend is active. ``scheduler`` (a name or dict) is used
        while the LoRA is loaded; None: the file's ``difforge.scheduler`` metadata, if any; False: ignore
        it. ``clear_lora`` restores the previous scheduler. See :mod:`difforge.lora`."""
        from ..lora import lora_manager

        return lora_manager(self).load(
            lora, scale=scale, fuse=fuse, target=target, name=name, strict=strict, scheduler=scheduler
        )

    def clear_lora(self, name: str | None = None) -> None:
        """Remove LoRA ``name`` (None: all); fused weights get their original bits back."""
        from ..lora import lora_manager

        lora_manager(self).clear(name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        from ..lora import lora_manager

        lora_manager(self).set_scale(name, scale)

    def export_lora(self, name: str, path: str | os.PathLike[str], format: str = "diffusers") -> Path:  # noqa: A002
        """Write a loaded LoRA in ``format`` (``diffusers``, ``kohya``, ``comfyui``, ...)."""
        from ..lora import lora_manager

        return lora_manager(self).export(name, path, format)

    def _model_spec(self, slot: str) -> Any:
        det = self.detections.get(slot)
        name = getattr(det, "model", None)
        if name is None:
            return None
        return get_registry().models.get(name)

    # ------------------------------------------------------------ the family's part

    def encode_prompt(self, prompt: Sequence[str], **kw: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_negative_prompt(
        self, negative_prompt: Sequence[str] | None, cond: Mapping[str, torch.Tensor], batch: int, **kw: Any
    ) -> dict[str, torch.Tensor]:
        """The unconditional branch's conditioning. ``negative_prompt`` is None when the caller gave
        none; the default encodes ``""`` then (families whose reference zeroes the embeddings of a
        missing negative prompt, as SDXL does, override this; ``cond`` is the positive one)."""
        return self.encode_prompt(list(negative_prompt) if negative_prompt is not None else [""] * batch, **kw)

    def latent_shape(self, batch: int, height: int, width: int, **kw: Any) -> tuple[int, ...]:
        raise NotImplementedError

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor], **kw: Any) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, **kw: Any) -> torch.Tensor:
        raise NotImplementedError

    def image_seq_len(self, shape: Sequence[int]) -> int | None:
        return None

    def check_call(self, kw: dict[str, Any]) -> None:
        """Family-specific argument checks and defaults (before any heavy work)."""

    def encode_source(self, kw: Mapping[str, Any], extra: Mapping[str, Any]) -> torch.Tensor | None:
        """The clean latents an image-to-image (or video-to-video) call starts from, or None.

        The default encodes ``input_image``; video families override it for ``input_video``.
        """
        if kw.get("input_image") is None:
            return None
        image = preprocess_image(kw["input_image"], kw["height"], kw["width"])
        return self.encode_image(image.to(self.device, self.torch_dtype))

    def prepare_latents(self, latents: torch.Tensor, kw: Mapping[str, Any], extra: Mapping[str, Any]) -> torch.Tensor:
        """The starting latents, after noise (and the source) were mixed; families that condition on
        a frame (image-to-video) replace part of them here. Default: unchanged."""
        return latents

    def after_step(self, latents: torch.Tensor, step: int, extra: Mapping[str, Any]) -> torch.Tensor:
        """Latents after scheduler step ``step`` (before the callback); default unchanged."""
        return latents

    # ------------------------------------------------------------ the shared runtime

    call_defaults: dict[str, Any] = {}

    def _merged(self, kw: dict[str, Any]) -> dict[str, Any]:
        merged = {**self.defaults, **self.call_defaults}
        merged.update({k: v for k, v in kw.items() if v is not None})
        return merged

    def check_inputs(self, kw: dict[str, Any]) -> None:
        steps = kw.get("num_inference_steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        m = self.spatial_multiple
        for dim in ("height", "width"):
            value = kw.get(dim)
            if not isinstance(value, int) or value <= 0 or value % m:
                raise ConfigError(f"{dim} must be a positive multiple of {m} for pipeline {self.spec.name!r}, got {value!r}")
        strength = kw.get("denoising_strength", 1.0)
        if not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
            raise ConfigError(f"denoising_strength must be in (0, 1], got {strength!r}")
        if strength < 1.0 and kw.get("input_image") is None and kw.get("input_video") is None:
            raise ConfigError("denoising_strength < 1 needs an input_image (or input_video) to start from")
        if kw.get("output_type", "pil") not in OUTPUT_TYPES:
            raise ConfigError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {kw.get('output_type')!r}")
        cfg = kw.get("cfg_scale", 1.0)
        if not isinstance(cfg, (int, float)) or isinstance(cfg, bool):
            raise ConfigError(f"cfg_scale must be a number (1.0 turns guidance off), got {cfg!r}")
        seed = kw.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        if kw.get("prompt") is None and kw.get("prompt_embeds") is None:
            raise ConfigError("give a prompt (or prompt_embeds=)")
        self.check_call(kw)

    def noise(self, shape: Sequence[int], seed: int | None, rand_device: str | torch.device = "cpu") -> torch.Tensor:
        """Gaussian noise from ``seed`` drawn on ``rand_device`` (default cpu, so a seed gives the same
        image on every device), moved to the pipeline's device and dtype."""
        generator = torch.Generator(device=rand_device)
        generator.manual_seed(int(seed) if seed is not None else int(torch.seed() % (2**63)))
        noise = torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=torch.float32)
        return noise.to(device=self.device, dtype=self.torch_dtype)

    def _predict_guided(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any] | None,
        cfg_scale: float,
        extra: Mapping[str, Any],
    ) -> torch.Tensor:
        state = self.parallel_state
        if state is not None and state.layout.cfg == 2:
            if uncond is not None:  # CFG parallel: one branch per rank
                branch = "cond" if state.cfg_rank == 0 else "uncond"
                with cfg_branch(branch):
                    mine = self.predict(latents, timestep, cond if branch == "cond" else uncond, **extra)
                positive, negative = _parallel.gather_cfg_branches(mine, state)
                return self.guide(positive, negative, cfg_scale)
            if state.wide_ok:  # no CFG: the CFG ranks shard the sequence too
                with cfg_branch("cond"), _parallel.widened():
                    return self.predict(latents, timestep, cond, **extra)
        with cfg_branch("cond"):
            positive = self.predict(latents, timestep, cond, **extra)
        if uncond is None:
            return positive
        with cfg_branch("uncond"):
            negative = self.predict(latents, timestep, uncond, **extra)
        return self.guide(positive, negative, cfg_scale)

    def guide(self, positive: torch.Tensor, negative: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance from the two branches' predictions; families with a rescale
        (Qwen-Image's per-token norm) override this."""
        return negative + cfg_scale * (positive - negative)

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        cfg_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        seed: int | None = None,
        rand_device: str | torch.device = "cpu",
        latents: torch.Tensor | None = None,
        prompt_embeds: Mapping[str, torch.Tensor] | None = None,
        negative_prompt_embeds: Mapping[str, torch.Tensor] | None = None,
        input_image: Any = None,
        denoising_strength: float = 1.0,
        output_type: str = "pil",
        callback: Callable[[Pipeline, int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
        progress_bar_cmd: Callable[..., Iterable[Any]] | None = None,
        **family_kwargs: Any,
    ) -> Any:
        """Generate. Returns a PIL image (or a list for a batch), or ``np``/``pt``/``latent`` arrays.

        ``callback(pipe, step, timestep, latents)`` runs after every step; returning a tensor
        replaces the latents. ``progress_bar_cmd`` wraps the step iterator (``lambda x: x`` for none).
        """
        kw = self._merged(
            dict(
                prompt=prompt, negative_prompt=negative_prompt, cfg_scale=cfg_scale, height=height, width=width,
                num_inference_steps=num_inference_steps, seed=seed, latents=latents, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, input_image=input_image,
                denoising_strength=denoising_strength, output_type=output_type, **family_kwargs,
            )
        )
        if latents is not None and height is None and width is None:
            kw["height"], kw["width"] = self.size_from_latents(latents)
        given = set(family_kwargs) | set(self.call_defaults)
        unknown = sorted(given - RUNTIME_ARGUMENTS - set(self.defaults) - set(self.call_arguments))
        if unknown:
            from ..errors import closest

            known = sorted({*RUNTIME_ARGUMENTS, *self.defaults, *self.call_arguments})
            hints = [f"{u!r}" + (f" (did you mean {h!r}?)" if (h := closest(u, known)) else "") for u in unknown]
            raise ConfigError(f"pipeline {self.spec.name!r} takes no argument {', '.join(hints)}")
        self.check_inputs(kw)
        extra = {k: v for k, v in kw.items() if k not in RUNTIME_ARGUMENTS}
        if self.parallel_state is not None and kw.get("seed") is None and kw.get("latents") is None:
            kw["seed"] = self.parallel_state.shared_seed()  # the same noise on every rank
        with torch.inference_mode(), use_attention(self.attention), _parallel.use(self.parallel_state):
            return self._run(kw, extra, rand_device, callback, progress_bar_cmd)

    def size_from_latents(self, latents: torch.Tensor) -> tuple[int, int]:
        return latents.shape[-2] * 8, latents.shape[-1] * 8

    def _run(
        self,
        kw: dict[str, Any],
        extra: dict[str, Any],
        rand_device: str | torch.device,
        callback: Callable[..., Any] | None,
        progress_bar_cmd: Callable[..., Iterable[Any]] | None,
    ) -> Any:
        prompt = kw.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        cfg_scale = float(kw["cfg_scale"])
        use_cfg = cfg_scale != 1.0
        if kw.get("prompt_embeds") is not None:
            cond = dict(kw["prompt_embeds"])
            batch = next(iter(cond.values())).shape[0]
        else:
            batch = len(prompts)
            cond = self.encode_prompt(prompts, **extra)
        uncond = None
        if use_cfg:
            if kw.get("negative_prompt_embeds") is not None:
                uncond = dict(kw["negative_prompt_embeds"])
            else:
                negative = kw.get("negative_prompt")
                negatives = None if negative is None else [negative] * batch if isinstance(negative, str) else list(negative)
                uncond = self.encode_negative_prompt(negatives, cond, batch, **extra)

        shape = self.latent_shape(batch, kw["height"], kw["width"], **extra)
        if kw.get("latents") is not None:
            noise = kw["latents"].to(device=self.device, dtype=self.torch_dtype)
            if tuple(noise.shape) != tuple(shape):
                raise ConfigError(f"latents has shape {tuple(noise.shape)}, expected {tuple(shape)} for this size")
        else:
            noise = self.noise(shape, kw.get("seed"), rand_device)

        strength = float(kw.get("denoising_strength", 1.0))
        self.scheduler.set_timesteps(
            kw["num_inference_steps"], denoising_strength=strength, image_seq_len=self.image_seq_len(shape), device=self.device
        )
        source = self.encode_source(kw, extra)
        latents = noise if source is None else self.scheduler.add_noise(source, noise, 0)
        latents = self.prepare_latents(latents, kw, extra)

        for handle in self._cache_handles:
            handle.reset()
        timesteps = self.scheduler.timesteps
        progress = progress_bar_cmd or _default_progress
        hook = get_plugin_manager().hook.difforge_step_end
        for i in progress(range(len(timesteps))):
            t = timesteps[i]
            velocity = self._predict_guided(latents, t, cond, uncond, cfg_scale, extra)
            latents = self.after_step(self.scheduler.step(velocity, i, latents), i, extra)
            if callback is not None:
                replaced = callback(self, i, t, latents)
                if replaced is not None:
                    latents = replaced
            hook(pipeline=self, step=i, timestep=t, latents=latents)

        if kw["output_type"] == "latent":
            return latents
        images = self.decode(latents, **extra)
        return postprocess(images, kw["output_type"])


def _check_names(
    registry: Any,
    spec: PipelineSpec,
    scheduler: PluginChoice | None,
    attention: PluginChoice | None,
    cache: PluginChoice | None,
    offload: list[PluginChoice],
) -> None:
    """Every plugin name and option is valid: checked before any file is read."""
    from ..schedulers import build_scheduler

    if scheduler is not None:
        build_scheduler(scheduler.as_arg(), family=spec.family)
    if attention is not None and normalize_name(attention.name) != "auto":
        registry.attention.get(attention.name)
    if cache is not None:
        c = registry.caches.get(cache.name)
        merge_options("cache strategy", c.name, c.options, cache.options)
    for choice in offload:
        o = registry.offload.get(choice.name)
        merge_options("offload backend", o.name, o.options, choice.options)
