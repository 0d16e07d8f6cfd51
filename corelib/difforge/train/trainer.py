"""Flow-matching training of any registered pipeline's denoiser, through the Pipeline API only.

Per batch: clean latents ``x0 = pipe.encode_image(images)`` and conditioning
``cond = pipe.encode_prompt(prompts)`` (frozen components, no grad; optionally cached per item), a
sigma and Gaussian noise per sample, ``x_t = sigma * noise + (1 - sigma) * x0``, the target
``pipe.scheduler.training_target(x0, noise)`` (``noise - x0``) and the prediction
``pipe.predict(x_t, sigma * num_train_timesteps, cond, **pipeline_args)`` with gradients; the loss is
their mean squared error. Nothing here knows a family: whatever a family pipeline implements for
generation is what training uses.

Each sample's noise and sigma come from its own generator, seeded from ``(seed, epoch, index)``: the
same item gets the same noise whatever the batch size, accumulation or number of processes.

``accelerate`` (the optional extra ``difforge[train]``) runs the loop: ``prepare``, ``accumulate``,
``backward``; several GPUs with ``accelerate launch -m difforge.cli train ...``. It is imported here
only, when training starts.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._names import resolve
from ..errors import ConfigError, closest
from .adapters import GradientCheckpointing, TrainableLora, lora_targets
from .config import TrainConfig
from .dataset import ImageTextDataset, SizeBuckets, read_metadata

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "train", "FlowMatchModule"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainResult:
    """What a run produced: the output folder, the files written, the loss per optimizer step."""

    output_path: Path
    files: list[Path] = field(default_factory=list)
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    mode: str = "full"


class FlowMatchModule(nn.Module):
    """The trained part, as one module (what ``accelerate`` prepares): the fully trained components or the
    LoRA adapters, and a ``forward`` that is the pipeline's ``predict``."""

    def __init__(self, pipe: Any, trainable: Mapping[str, nn.Module], lora: TrainableLora | None,
                 extra: Mapping[str, Any]) -> None:
        super().__init__()
        self.trainable = nn.ModuleDict(dict(trainable))
        self.lora = lora
        self.__dict__["pipe"] = pipe  # not a submodule
        self.__dict__["extra"] = dict(extra)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        return self.pipe.predict(latents, timestep, cond, **self.extra)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919_113 + index * 104_729 + 12_345) % (2**63 - 1)


def _noise_and_sigma(shape: Sequence[int], indices: Sequence[int], epoch: int, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample noise ``[B, *shape]`` and sigma ``[B]`` (float32, CPU)."""
    noises, sigmas = [], []
    for index in indices:
        g = torch.Generator().manual_seed(_sample_seed(config.seed, epoch, int(index)))
        if config.sigma_sampling == "logit_normal":
            t = torch.sigmoid(torch.randn(1, generator=g))
        else:
            t = torch.rand(1, generator=g)
        s = config.sigma_shift
        sigmas.append(s * t / (1 + (s - 1) * t))
        noises.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(noises), torch.cat(sigmas)


def _cat_cond(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate per-item conditioning along the batch; sequences of different lengths are
    right-padded with zeros (padding masks then mark the padding invalid)."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if not all(isinstance(v, torch.Tensor) for v in values):
            out[key] = values[0]
            continue
        if values[0].dim() >= 2 and len({v.shape[1] for v in values}) > 1:
            n = max(v.shape[1] for v in values)
            values = [F.pad(v, (0, 0) * (v.dim() - 2) + (0, n - v.shape[1])) for v in values]
        out[key] = torch.cat(values)
    return out


def _split_cond(cond: Mapping[str, Any], batch: int) -> list[dict[str, Any]]:
    return [
        {k: (v[i : i + 1].detach().cpu() if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else v)
         for k, v in cond.items()}
        for i in range(batch)
    ]


def _model_configs(config: TrainConfig) -> list[Any]:
    from ..loading.model_config import ModelConfig

    items: list[Any] = []
    for item in config.model_paths:
        items.append(ModelConfig(path=[str(p) for p in item]) if isinstance(item, list) else str(item))
    for item in config.model_id_with_origin_paths:
        model_id, sep, pattern = str(item).partition(":")
        if not sep or not model_id or not pattern:
            raise ConfigError(f"train: --model_id_with_origin_paths item {item!r} is not MODEL_ID:FILE_PATTERN")
        items.append(ModelConfig(model_id=model_id, origin_file_pattern=pattern))
    return items


def _lr_lambda(config: TrainConfig, total: int) -> Callable[[int], float]:
    warmup = config.lr_warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.lr_scheduler == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


class _Run:
    """One training run (see :func:`train`)."""

    def __init__(self, config: TrainConfig, on_gradients: Callable[[dict[str, torch.Tensor]], None] | None) -> None:
        self.config = config
        self.on_gradients = on_gradients

    # ------------------------------------------------------------ setup (checks first)

    def setup(self) -> None:
        config = self.config
        config.check()
        from ..plugins import get_registry

        spec = get_registry().pipelines.get(config.pipeline)
        multiple = int(getattr(resolve(spec.pipeline), "spatial_multiple", 16))
        fixed = None
        if config.height is not None:
            for dim in ("height", "width"):
                if getattr(config, dim) % multiple:
                    raise ConfigError(
                        f"train: --{dim} must be a multiple of {multiple} for pipeline {spec.name!r}, "
                        f"got {getattr(config, dim)}"
                    )
            fixed = (config.height, config.width)
        rows = read_metadata(config.metadata_path, Path(config.dataset_base_path))
        self.dataset = ImageTextDataset(rows, fixed=fixed, max_pixels=config.max_pixels, multiple=multiple,
                                        repeat=config.dataset_repeat)
        try:
            import accelerate
        except ImportError as exc:
            raise ConfigError("train: difforge train needs accelerate; pip install 'difforge[train]'") from exc

        cpu = config.device is not None and torch.device(config.device).type == "cpu"
        self.accelerator = accelerate.Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            cpu=cpu,
        )
        self.device = torch.device(config.device) if config.device and not cpu else self.accelerator.device
        from ..runtime.pipeline import Pipeline

        self.pipe = pipe = Pipeline.from_pretrained(
            config.pipeline, model_configs=_model_configs(config), tokenizer_config=config.tokenizer_paths or None,
            device=self.device, torch_dtype=_DTYPES[config.torch_dtype],
        )
        self.extra = self._pipeline_args()
        models = pipe.models()
        for module in models.values():
            module.requires_grad_(False)
            module.eval()
        dit_slots = [s for s in pipe.denoiser_slots() if s in models]
        slots = ([config.lora_base_model] if config.lora_base_model else dit_slots[:1]) if config.lora else (
            config.trainable_models or dit_slots[:1]
        )
        for slot in slots:
            if slot not in models:
                raise ConfigError(
                    f"train: {slot!r} is not a model component of pipeline {spec.name!r}; "
                    f"choose from {', '.join(models)}"
                )
        if not slots:
            raise ConfigError(f"train: pipeline {spec.name!r} has no denoiser (dit) slot; name one with --trainable_models")
        self.slots = slots
        self.checkpointing: list[GradientCheckpointing] = []
        self.lora: TrainableLora | None = None
        trainable: dict[str, nn.Module] = {}
        try:
            if config.lora:
                slot = slots[0]
                module = models[slot]
                names = lora_targets(module, config.lora_target_modules, getattr(pipe._model_spec(slot), "layout", None))
                self.lora = TrainableLora(module, names, config.lora_rank or 32, config.lora_alpha, seed=config.seed)
                log.info("LoRA rank %d on %d linear layers of %s", self.lora.rank, len(names), slot)
            else:
                for slot in slots:
                    module = models[slot]
                    if any(p.dtype != torch.float32 for p in module.parameters()):
                        module.float()  # float32 master weights
                    module.requires_grad_(True)
                    module.train()
                    trainable[slot] = module
                log.info("full training of %s (%d parameters)", ", ".join(slots),
                         sum(p.numel() for m in trainable.values() for p in m.parameters()))
            if config.use_gradient_checkpointing:
                for slot in slots:
                    self.checkpointing.append(GradientCheckpointing(models[slot], getattr(pipe._model_spec(slot), "layout", None)))
        except BaseException:
            self.teardown()
            raise
        self.module = FlowMatchModule(pipe, trainable, self.lora, self.extra)
        self.train_dtype = torch.float32

    def _pipeline_args(self) -> dict[str, Any]:
        from ..runtime.pipeline import RUNTIME_ARGUMENTS

        pipe, given = self.pipe, dict(self.config.pipeline_args)
        known = {*pipe.defaults, *getattr(pipe, "call_arguments", ())}
        unknown = sorted(k for k in given if k not in known or k in RUNTIME_ARGUMENTS)
        if unknown:
            hints = [f"{u!r}" + (f" (did you mean {h!r}?)" if (h := closest(u, sorted(known))) else "") for u in unknown]
            raise ConfigError(f"train: --pipeline_args: pipeline {pipe.spec.name!r} takes no argument {', '.join(hints)}")
        merged = pipe._merged(given)
        pipe.check_call(merged)
        return {k: v for k, v in merged.items() if k not in RUNTIME_ARGUMENTS}

    def teardown(self) -> None:
        for handle in reversed(getattr(self, "checkpointing", [])):
            handle.remove()
        self.checkpointing = []
        if getattr(self, "lora", None) is not None:
            self.lora.remove()

    # ------------------------------------------------------------ inputs

    @torch.no_grad()
    def encode(self, images: torch.Tensor | None, prompts: Sequence[str]) -> tuple[torch.Tensor | None, dict[str, Any]]:
        pipe = self.pipe
        x0 = None if images is None else pipe.encode_image(images.to(self.device, pipe.torch_dtype))
        cond = pipe.encode_prompt(list(prompts), **self.extra)
        return x0, cond

    def build_cache(self) -> None:
        """Every row's latents and conditioning, computed once (in batches of one size)."""
        ds = self.dataset
        self.cache_latents: dict[int, torch.Tensor] = {}
        self.cache_cond: dict[int, dict[str, Any]] = {}
        rows = len(ds.rows)
        sampler = SizeBuckets(ds.sizes, self.config.batch_size, shuffle=False)
        start = time.perf_counter()
        for chunk in sampler:
            items = [ds[i] for i in chunk]
            x0, cond = self.encode(torch.stack([it["image"] for it in items]), [it["prompt"] for it in items])
            for i, latent, c in zip(chunk, x0, _split_cond(cond, len(chunk))):
                self.cache_latents[i] = latent.detach().cpu()
                self.cache_cond[i] = c
        log.info("cached the latents and prompt embeddings of %d items in %.1fs", rows, time.perf_counter() - start)

    def inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.config.cache_inputs:
            rows = [self.dataset.row(int(i)) for i in batch["index"]]
            x0 = torch.stack([self.cache_latents[r] for r in rows]).to(self.device)
            cond = _cat_cond([self.cache_cond[r] for r in rows])
            cond = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
            return x0, cond
        x0, cond = self.encode(batch["image"], batch["prompt"])
        return x0, cond

    def loss(self, batch: Mapping[str, Any], epoch: int) -> torch.Tensor:
        x0, cond = self.inputs(batch)
        x0 = x0.to(self.train_dtype)
        cond = {k: v.to(self.train_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in cond.items()}
        noise, sigma = _noise_and_sigma(x0.shape[1:], [int(i) for i in batch["index"]], epoch, self.config)
        noise = noise.to(x0.device, x0.dtype)
        sigma = sigma.to(x0.device, x0.dtype)
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        x_t = s * noise + (1 - s) * x0
        target = self.pipe.scheduler.training_target(x0, noise)
        timestep = sigma * float(getattr(self.pipe.scheduler, "num_train_timesteps", 1000))
        with self.accelerator.autocast():  # through the prepared wrapper, so gradients sync across processes
            prediction = getattr(self, "prepared", self.module)(x_t, timestep, cond)
        return F.mse_loss(prediction.float(), target.float())

    # ------------------------------------------------------------ saving

    def save(self, tag: str) -> list[Path]:
        from ..loading.state_dict import save_safetensors

        if not self.accelerator.is_main_process:
            return []
        out = Path(self.config.output_path)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        if self.lora is not None:
            from ..lora.formats import export_converter, from_own, save_lora

            slot = self.slots[0]
            model_name = self.pipe.detections[slot].model
            groups = self.lora.own_groups()
            if self.lora.scale != 1.0:  # alpha baked into B: every reader gets the same scale
                groups = {m: {"A": g["A"], "B": g["B"] * self.lora.scale} for m, g in groups.items()}
            else:
                groups = {m: {"A": g["A"], "B": g["B"]} for m, g in groups.items()}
            tensors = from_own(groups, export_converter(model_name, "diffusers"), f"trained LoRA ({slot})")
            written.append(save_lora(tensors, out / f"{tag}.safetensors", "diffusers"))
        else:
            for slot in self.slots:
                module = self.pipe.components[slot]
                state = {k: v.detach().to("cpu") for k, v in module.state_dict().items()}
                name = f"{tag}.safetensors" if len(self.slots) == 1 else f"{tag}-{slot}.safetensors"
                written.append(save_safetensors(state, out / name, {"format": "pt", "difforge_trained": slot}))
        for path in written:
            log.info("saved %s", path)
        return written

    # ------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        config, acc = self.config, self.accelerator
        out = Path(config.output_path)
        if config.cache_inputs:
            self.build_cache()
            self.dataset.load_images = False
        sampler = SizeBuckets(self.dataset.sizes * config.dataset_repeat, config.batch_size, seed=config.seed)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=config.num_workers)
        params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        module, optimizer, loader = acc.prepare(self.module, optimizer, loader)
        self.prepared = module  # DistributedDataParallel around self.module on several processes
        per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)  # this process's share
        total = per_epoch * config.num_epochs
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                                                      _lr_lambda(config, total))

        result = TrainResult(out, mode="lora" if self.lora is not None else "full")
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_config.json").write_text(json.dumps(config.as_dict(), indent=2, default=str))
        log_file = open(out / "loss.csv", "w", newline="") if acc.is_main_process else open(os.devnull, "w")  # noqa: SIM115
        writer = csv.writer(log_file)
        writer.writerow(["step", "epoch", "loss", "lr", "elapsed_s"])
        from tqdm.auto import tqdm

        progress = tqdm(total=total, desc="train", disable=not acc.is_local_main_process)
        start = time.perf_counter()
        step, pending = 0, []
        try:
            for epoch in range(config.num_epochs):
                sampler.set_epoch(epoch)
                for batch in loader:
                    with acc.accumulate(module):
                        loss = self.loss(batch, epoch)
                        acc.backward(loss)
                        pending.append(loss.detach().float().item())
                        if acc.sync_gradients:
                            if self.on_gradients is not None:
                                self.on_gradients({n: p.grad.detach().clone() for n, p in self.module.named_parameters()
                                                   if p.grad is not None})
                            if config.max_grad_norm is not None:
                                acc.clip_grad_norm_(params, config.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    if not acc.sync_gradients:
                        continue
                    scheduler.step()
                    step += 1
                    value = sum(pending) / len(pending)
                    pending = []
                    result.losses.append(value)
                    elapsed = time.perf_counter() - start
                    writer.writerow([step, epoch, f"{value:.6f}", f"{scheduler.get_last_lr()[0]:.3e}", f"{elapsed:.1f}"])
                    progress.update(1)
                    progress.set_postfix(loss=f"{value:.4f}")
                    if step % config.log_steps == 0 or step == total:
                        log_file.flush()
                        recent = result.losses[-config.log_steps :]
                        log.info("step %d/%d epoch %d: loss %.5f (mean of last %d: %.5f), %.1fs",
                                 step, total, epoch, value, len(recent), sum(recent) / len(recent), elapsed)
                    if config.save_steps and step % config.save_steps == 0:
                        result.files += self.save(f"step-{step}")
                    if step >= total:
                        break
                if step >= total and step % per_epoch:
                    break  # stopped by --max_steps inside an epoch
                result.files += self.save(f"epoch-{epoch}")
                if step >= total:
                    break
            acc.wait_for_everyone()
            if step % per_epoch and not (config.save_steps and step % config.save_steps == 0):
                result.files += self.save(f"step-{step}")
        finally:
            progress.close()
            log_file.close()
            self.teardown()
        result.steps = step
        result.wall_s = time.perf_counter() - start
        log.info("trained %d steps in %.1fs; wrote %s", step, result.wall_s, ", ".join(map(str, result.files)) or "nothing")
        return result


def train(config: TrainConfig, *, on_gradients: Callable[[dict[str, torch.Tensor]], None] | None = None) -> TrainResult:
    """Train as ``config`` says; returns what was written (see :class:`TrainConfig` for the options).

    Output folder: ``epoch-{n}.safetensors`` after every epoch (or ``step-{n}.safetensors`` at
    ``--max_steps``), ``step-{n}.safetensors`` every ``save_steps``, ``loss.csv`` (one row per optimizer
    step) and ``train_config.json``. Full training writes the components' weights in their own layout
    (a FLUX.1 DiT as BFL keys, detected by difforge like the release); LoRA training writes the
    diffusers/PEFT layout (``pipe.load_lora`` and diffusers' ``load_lora_weights`` both read it).

    ``on_gradients(grads)``: called with a copy of the trained parameters' gradients before each
    optimizer step (before clipping), for tests and diagnostics.
    """
    run = _Run(config, on_gradients)
    run.setup()
    return run.run()
