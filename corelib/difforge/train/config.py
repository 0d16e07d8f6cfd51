"""The options of ``difforge train`` (:class:`TrainConfig`) and their command-line form.

The argument names are the ones DiffSynth-Studio's training scripts use (``--dataset_base_path``,
``--dataset_metadata_path``, ``--max_pixels``, ``--height``/``--width``, ``--learning_rate``,
``--num_epochs``, ``--output_path``, ``--lora_base_model``, ``--lora_target_modules``,
``--lora_rank``, ``--use_gradient_checkpointing``, ``--gradient_accumulation_steps``,
``--save_steps``, ``--dataset_repeat``, ``--model_paths``, ``--model_id_with_origin_paths``,
``--trainable_models``). This module imports no torch, so building the CLI parser stays fast.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["TrainConfig", "add_train_arguments", "config_from_args"]

SIGMA_SAMPLING = ("uniform", "logit_normal")
LR_SCHEDULERS = ("constant", "cosine")
MIXED_PRECISION = ("no", "bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    """Everything one training run needs. See :func:`difforge.train.train`.

    Full fine-tuning trains the components named in ``trainable_models`` (default: the pipeline's
    denoiser, the ``dit`` slot); LoRA (``lora_rank`` or ``lora_base_model`` given) freezes the model and
    trains low-rank adapters on the ``nn.Linear`` layers whose names match ``lora_target_modules``
    (comma-separated; a pattern matches a module whose dotted name equals it, ends with ``.pattern``, or
    matches it as an ``fnmatch`` glob; default: every linear layer inside the model's transformer blocks).
    """

    pipeline: str
    model_paths: list[Any] = field(default_factory=list)
    model_id_with_origin_paths: list[str] = field(default_factory=list)
    tokenizer_paths: list[str] = field(default_factory=list)
    dataset_base_path: str = ""
    dataset_metadata_path: str | None = None
    dataset_repeat: int = 1
    height: int | None = None
    width: int | None = None
    max_pixels: int | None = None
    batch_size: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    num_epochs: int = 1
    max_steps: int | None = None
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    output_path: str = "./models/train"
    save_steps: int | None = None
    trainable_models: list[str] = field(default_factory=list)
    lora_base_model: str | None = None
    lora_target_modules: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    use_gradient_checkpointing: bool = False
    cache_inputs: bool = False
    sigma_sampling: str = "uniform"
    sigma_shift: float = 1.0
    pipeline_args: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str | None = None
    torch_dtype: str = "float32"
    mixed_precision: str = "no"
    num_workers: int = 0
    log_steps: int = 10

    @property
    def lora(self) -> bool:
        return self.lora_rank is not None or self.lora_base_model is not None

    @property
    def metadata_path(self) -> Path:
        return Path(self.dataset_metadata_path) if self.dataset_metadata_path else Path(self.dataset_base_path) / "metadata.csv"

    def check(self) -> None:
        """Every option is valid (raises :class:`~difforge.ConfigError` saying which and what to do)."""

        def positive_int(name: str, value: Any, minimum: int = 1) -> None:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise ConfigError(f"train: --{name} must be an integer >= {minimum}, got {value!r}")

        for name in ("dataset_repeat", "batch_size", "num_epochs", "gradient_accumulation_steps", "log_steps"):
            positive_int(name, getattr(self, name))
        for name in ("max_steps", "save_steps", "lora_rank", "height", "width", "max_pixels"):
            positive_int(name, getattr(self, name))
        positive_int("lr_warmup_steps", self.lr_warmup_steps, 0)
        positive_int("num_workers", self.num_workers, 0)
        positive_int("seed", self.seed, 0)
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            raise ConfigError(f"train: --learning_rate must be a positive number, got {self.learning_rate!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ConfigError(f"train: --weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"train: --max_grad_norm must be positive (or omitted), got {self.max_grad_norm!r}")
        if not isinstance(self.sigma_shift, (int, float)) or not self.sigma_shift > 0:
            raise ConfigError(f"train: --sigma_shift must be positive, got {self.sigma_shift!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"train: --lora_alpha must be positive, got {self.lora_alpha!r}")
        for name, value, choices in (
            ("sigma_sampling", self.sigma_sampling, SIGMA_SAMPLING),
            ("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS),
            ("mixed_precision", self.mixed_precision, MIXED_PRECISION),
            ("torch_dtype", self.torch_dtype, DTYPES),
        ):
            if value not in choices:
                raise ConfigError(f"train: --{name} must be one of {', '.join(choices)}, got {value!r}")
        if (self.height is None) != (self.width is None):
            raise ConfigError("train: give both --height and --width (fixed resolution), or neither (--max_pixels)")
        if self.height is not None and self.max_pixels is not None:
            raise ConfigError("train: --height/--width (fixed resolution) and --max_pixels (dynamic) exclude each other")
        if self.lora and self.trainable_models:
            raise ConfigError(
                "train: --trainable_models (full fine-tuning) and --lora_base_model/--lora_rank (LoRA) exclude each "
                "other; pick one"
            )
        if not self.lora and self.lora_target_modules:
            raise ConfigError("train: --lora_target_modules needs LoRA training: add --lora_rank (and --lora_base_model)")
        if not isinstance(self.pipeline_args, dict):
            raise ConfigError(f"train: --pipeline_args must be a JSON object, got {self.pipeline_args!r}")
        if not self.model_paths and not self.model_id_with_origin_paths:
            raise ConfigError("train: give the model files with --model_paths (or --model_id_with_origin_paths)")
        if not self.dataset_base_path:
            raise ConfigError("train: give the dataset folder with --dataset_base_path (images and metadata.csv)")
        if not Path(self.dataset_base_path).is_dir():
            raise ConfigError(f"train: --dataset_base_path {self.dataset_base_path!r} is not a folder")
        if not self.metadata_path.is_file():
            raise ConfigError(
                f"train: no metadata file {str(self.metadata_path)!r}; write a metadata.csv with columns image,prompt "
                "into the dataset folder, or point --dataset_metadata_path at one"
            )

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _list(value: str | None) -> list[Any]:
    """A JSON list, or a comma-separated list of strings."""
    if value is None or value == "":
        return []
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"train: cannot read {value!r} as a JSON list: {exc}") from exc
        if not isinstance(parsed, list):
            raise ConfigError(f"train: expected a JSON list, got {value!r}")
        return parsed
    return [part.strip() for part in text.split(",") if part.strip()]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The ``difforge train`` arguments (DiffSynth-Studio's names where it has them)."""
    p.add_argument("pipeline", help="the pipeline to train, e.g. flux, qwen-image, wan")
    g = p.add_argument_group("model")
    g.add_argument("--model_paths", help="model files or folders: a JSON list (shards as a nested list) or comma-separated")
    g.add_argument("--model_id_with_origin_paths", help="MODEL_ID:FILE_PATTERN items, comma-separated (downloads)")
    g.add_argument("--tokenizer_paths", help="tokenizer folders, comma-separated or a JSON list")
    g.add_argument("--pipeline_args", default="{}", help='JSON object of pipeline call arguments, e.g. {"max_sequence_length": 16}')
    g = p.add_argument_group("data")
    g.add_argument("--dataset_base_path", required=True, help="folder with the images and metadata.csv (image,prompt)")
    g.add_argument("--dataset_metadata_path", help="metadata file (default: DATASET_BASE_PATH/metadata.csv)")
    g.add_argument("--dataset_repeat", type=int, default=1, help="passes over the data per epoch")
    g.add_argument("--height", type=int, help="fixed resolution (with --width): resize and centre-crop")
    g.add_argument("--width", type=int)
    g.add_argument("--max_pixels", type=int, help="dynamic resolution: images larger than this are scaled down")
    g.add_argument("--batch_size", type=int, default=1)
    g.add_argument("--cache_inputs", action="store_true", help="encode every item's latents and prompt once, in memory")
    g.add_argument("--num_workers", type=int, default=0, help="data loader worker processes")
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--num_epochs", type=int, default=1)
    g.add_argument("--max_steps", type=int, help="stop after this many optimizer steps")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--use_gradient_checkpointing", action="store_true")
    g.add_argument("--sigma_sampling", choices=SIGMA_SAMPLING, default="uniform")
    g.add_argument("--sigma_shift", type=float, default=1.0, help="shift the sampled sigmas: s*t / (1 + (s-1)*t)")
    g.add_argument("--mixed_precision", choices=MIXED_PRECISION, default="no")
    g.add_argument("--torch_dtype", choices=DTYPES, default="float32", help="dtype the frozen components are loaded in")
    g.add_argument("--device", help="default: the accelerator's device")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("what to train")
    g.add_argument("--trainable_models", help="component slots to fine-tune fully, comma-separated (default: dit)")
    g.add_argument("--lora_base_model", help="train a LoRA on this component slot (e.g. dit)")
    g.add_argument("--lora_target_modules", help="comma-separated module-name patterns (default: every linear layer in the blocks)")
    g.add_argument("--lora_rank", type=int)
    g.add_argument("--lora_alpha", type=float, help="default: the rank (scale 1)")
    g = p.add_argument_group("output")
    g.add_argument("--output_path", default="./models/train")
    g.add_argument("--save_steps", type=int, help="also write a checkpoint every N optimizer steps")
    g.add_argument("--log_steps", type=int, default=10)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    try:
        pipeline_args = json.loads(args.pipeline_args or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"train: --pipeline_args is not valid JSON ({exc}); e.g. '{{\"max_sequence_length\": 16}}'") from exc
    keys = {f.name for f in fields(TrainConfig)} - {"pipeline_args", "model_paths", "model_id_with_origin_paths",
                                                      "tokenizer_paths", "trainable_models"}
    values = {k: getattr(args, k) for k in keys if hasattr(args, k) and getattr(args, k) is not None}
    return TrainConfig(
        pipeline=args.pipeline,
        model_paths=_list(args.model_paths),
        model_id_with_origin_paths=_list(args.model_id_with_origin_paths),
        tokenizer_paths=_list(args.tokenizer_paths),
        trainable_models=_list(args.trainable_models),
        pipeline_args=pipeline_args,
        **{k: v for k, v in values.items() if k != "pipeline"},
    )
