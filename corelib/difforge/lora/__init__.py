"""LoRA for every pipeline: load, fuse or hot-apply, rescale, clear and export, in every format a
family plugin registers a converter for.

Pipelines expose it as ``pipe.load_lora(path, scale=1.0, fuse=None, target="dit", name=None,
strict=True)``, ``pipe.clear_lora(name=None)``, ``pipe.set_lora_scale(name, scale)`` and
``pipe.export_lora(name, path, format="diffusers")`` (:mod:`.manager`). Formats are recognised from
keys by the ``ConverterSpec(kind="lora")`` converters family plugins register: each turns a file
into the own-layout grammar of :mod:`.keys` for its target model. :func:`convert_lora` rewrites a
LoRA file in another format without a model.

Modes. *Fused* merges ``scale * alpha / r * B @ A`` into the weights (no cost at run time); the
original weight tensors are kept (CPU weights: the same storage, no copy; accelerator weights: a CPU
copy), so clearing restores them bit for bit. *Hot* adds ``scale * B(A(x))`` to the layer's output
from a removable forward hook; it works on fp8-stored and offloaded layers. ``fuse=None`` fuses
unless an offload backend is active; ``fuse=True`` on fp8-stored or streamed (sequential/disk)
weights is refused with a :class:`~difforge.ConfigError`. ``pipe.set_offload`` takes fused LoRAs out
of the weights while the backends change and puts them back, fused where the new backends allow it,
else hot (:func:`offload_change`); clearing restores the original weights either way.
``lora_manager(pipe).loras`` lists what is loaded (:class:`LoadedLora`).

Settings. ``load_lora(..., scheduler=...)`` or the file's ``difforge.scheduler`` metadata
(:data:`SCHEDULER_KEY`, JSON: a scheduler name or ``{"name": ..., **options}``) sets the pipeline's
scheduler while the LoRA is loaded (distilled "Lightning" LoRAs need their own shift); the
``difforge.call_defaults`` metadata (:data:`CALL_DEFAULTS_KEY`, a JSON object such as
``{"num_inference_steps": 8, "cfg_scale": 1.0}``) sets call defaults. ``clear_lora`` restores what
the pipeline had before; export and :func:`convert_lora` keep both entries.
"""

from __future__ import annotations

from .formats import CALL_DEFAULTS_KEY, SCHEDULER_KEY, LoraFile, convert_lora, lora_converters, read_lora
from .keys import (
    KOHYA_SUFFIXES,
    PEFT_SUFFIXES,
    bake_alpha,
    claims_any,
    group_by_module,
    lora_inverse_renamer,
    lora_renamer,
    merge_parts,
    own_key,
    parse_own_key,
    require_whole_rows,
    split_lora_key,
    split_parts,
    ungroup,
)
from .layers import FusedWeight, HotLayer, LoraDelta
from .manager import LoadedLora, LoraManager, lora_manager, offload_change

__all__ = [
    "CALL_DEFAULTS_KEY",
    "KOHYA_SUFFIXES",
    "SCHEDULER_KEY",
    "PEFT_SUFFIXES",
    "FusedWeight",
    "HotLayer",
    "LoadedLora",
    "LoraDelta",
    "LoraFile",
    "LoraManager",
    "bake_alpha",
    "claims_any",
    "convert_lora",
    "group_by_module",
    "lora_converters",
    "lora_inverse_renamer",
    "lora_manager",
    "lora_renamer",
    "merge_parts",
    "offload_change",
    "own_key",
    "parse_own_key",
    "read_lora",
    "require_whole_rows",
    "split_lora_key",
    "split_parts",
    "ungroup",
]
