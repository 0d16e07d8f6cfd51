"""``difforge train``: flow-matching training (full or LoRA) of any registered pipeline's denoiser.

Install with the optional extra ``pip install 'difforge[train]'`` (``accelerate``). From Python::

    from difforge.train import TrainConfig, train

    result = train(TrainConfig(
        pipeline="flux", model_paths=["flux1-dev.safetensors", "ae.safetensors", "clip_l.safetensors", "t5/"],
        tokenizer_paths=["tokenizer", "tokenizer_2"], dataset_base_path="data/",  # data/metadata.csv: image,prompt
        height=1024, width=1024, lora_base_model="dit", lora_rank=16, learning_rate=1e-4, output_path="out/",
    ))

and from the command line: ``difforge train flux --model_paths ... --dataset_base_path data/ --lora_rank 16``
(the argument names are DiffSynth-Studio's; ``difforge train --help``). See :mod:`.trainer` for what
one step computes, :mod:`.adapters` for the LoRA adapters and gradient checkpointing, :mod:`.dataset`
for the data folder and resolutions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import TrainConfig, add_train_arguments, config_from_args

if TYPE_CHECKING:
    from .trainer import TrainResult

__all__ = ["TrainConfig", "TrainResult", "add_train_arguments", "config_from_args", "train"]


def train(config: TrainConfig, **kw: Any) -> TrainResult:
    """Run a training (see :func:`difforge.train.trainer.train`)."""
    from .trainer import train as _train

    return _train(config, **kw)


def __getattr__(name: str) -> Any:
    if name == "TrainResult":
        from .trainer import TrainResult

        return TrainResult
    raise AttributeError(name)
