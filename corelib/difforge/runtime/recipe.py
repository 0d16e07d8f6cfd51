"""TOML recipes: a pipeline, its files and its call defaults in one file.

```toml
output = "cat.png"                     # optional, used by `difforge run`

[pipeline]
name = "flux"
torch_dtype = "bfloat16"               # float32 | float16 | bfloat16
device = "cuda"
attention = "sdpa"
cache = { name = "fbcache", threshold = 0.08 }
offload = ["fp8", "sequential"]
scheduler = { name = "flow-euler", shift = 3.0 }
# folder = "models/FLUX.1-dev"         # a diffusers-layout folder instead of [[models]]

[[models]]                             # ModelConfig fields
model_id = "black-forest-labs/FLUX.1-dev"
origin_file_pattern = "flux1-dev.safetensors"

[[models]]
path = ["models/t5/model-00001-of-00002.safetensors", "models/t5/model-00002-of-00002.safetensors"]

[[tokenizers]]
path = "models/tokenizer"

[defaults]                             # pipeline call arguments
prompt = "a cat holding a sign"
num_inference_steps = 28
seed = 0
```
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PIPELINE_KEYS = (
    "name", "torch_dtype", "device", "attention", "cache", "offload", "scheduler", "folder",
    "parallelism", "cfg_parallel", "ulysses_degree", "ring_degree",
)
PARALLEL_KEYS = ("parallelism", "cfg_parallel", "ulysses_degree", "ring_degree")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class Recipe:
    name: str
    models: list[dict[str, Any]] = field(default_factory=list)
    tokenizers: list[dict[str, Any]] = field(default_factory=list)
    torch_dtype: str | None = None
    device: str | None = None
    attention: Any = None
    cache: Any = None
    offload: Any = None
    scheduler: Any = None
    folder: str | None = None
    parallelism: int | None = None
    cfg_parallel: int | None = None
    ulysses_degree: int | None = None
    ring_degree: int | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    source: str | None = None

    def pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`Pipeline.from_pretrained` (after the name)."""
        import torch

        from ..loading.model_config import ModelConfig

        base = Path(self.source).parent if self.source else Path(".")

        def config(entry: Mapping[str, Any]) -> Any:
            entry = dict(entry)
            if "path" in entry:  # relative paths are relative to the recipe file
                entry["path"] = _rebase(entry["path"], base)
            try:
                return ModelConfig(**entry)
            except TypeError as exc:
                raise ConfigError(f"{self.source or 'recipe'}: bad [[models]] entry {dict(entry)!r}: {exc}") from exc

        if self.folder:
            model_configs: Any = str(_rebase(self.folder, base))
        else:
            model_configs = [config(m) for m in self.models] or None
        return dict(
            model_configs=model_configs,
            tokenizer_config=[config(t) for t in self.tokenizers] or None,
            torch_dtype=getattr(torch, self.torch_dtype) if self.torch_dtype else None,
            device=self.device,
            attention=self.attention,
            cache=self.cache,
            offload=self.offload,
            scheduler=self.scheduler,
            **{k: getattr(self, k) for k in PARALLEL_KEYS},
        )

    def to_toml(self) -> str:
        """The recipe as TOML text (``load_recipe`` reads it back to an equal Recipe)."""
        lines = []
        if self.output:
            lines.append(f"output = {_value(self.output)}")
        lines.append("[pipeline]")
        for key in PIPELINE_KEYS:
            value = getattr(self, key)
            if value is not None:
                lines.append(f"{key} = {_value(value)}")
        for table, entries in (("models", self.models), ("tokenizers", self.tokenizers)):
            for entry in entries:
                lines.append(f"\n[[{table}]]")
                lines += [f"{k} = {_value(v)}" for k, v in entry.items() if v is not None]
        if self.defaults:
            lines.append("\n[defaults]")
            lines += [f"{k} = {_value(v)}" for k, v in self.defaults.items()]
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml(), encoding="utf-8")


def _rebase(path: Any, base: Path) -> Any:
    if isinstance(path, list):
        return [_rebase(p, base) for p in path]
    p = Path(path)
    return str(p if p.is_absolute() or not (base / p).exists() else base / p)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise ConfigError(f"recipe values must be finite, got {v}")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    if dataclasses.is_dataclass(v):
        return _value(dataclasses.asdict(v))  # type: ignore[arg-type]
    raise ConfigError(f"cannot write {type(v).__name__} value {v!r} into a TOML recipe")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def parse_recipe(data: Mapping[str, Any], source: str | None = None) -> Recipe:
    where = source or "recipe"
    unknown = sorted(set(data) - {"pipeline", "models", "tokenizers", "defaults", "output"})
    if unknown:
        raise ConfigError(f"{where}: unknown top-level keys {unknown}; expected [pipeline], [[models]], [[tokenizers]], [defaults], output")
    pipeline = data.get("pipeline")
    if not isinstance(pipeline, Mapping) or not isinstance(pipeline.get("name"), str):
        raise ConfigError(f"{where}: needs a [pipeline] table with name = \"<pipeline name>\"")
    bad = sorted(set(pipeline) - set(PIPELINE_KEYS))
    if bad:
        raise ConfigError(f"{where}: unknown [pipeline] keys {bad}; allowed: {', '.join(PIPELINE_KEYS)}")
    dtype = pipeline.get("torch_dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"{where}: torch_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for table in ("models", "tokenizers"):
        entries = data.get(table, [])
        if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
            raise ConfigError(f"{where}: [[{table}]] must be an array of tables")
    for key in PARALLEL_KEYS:
        value = pipeline.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{where}: [pipeline] {key} must be an integer >= 1, got {value!r}")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, Mapping):
        raise ConfigError(f"{where}: [defaults] must be a table of call arguments")
    return Recipe(
        name=pipeline["name"],
        models=[dict(m) for m in data.get("models", [])],
        tokenizers=[dict(t) for t in data.get("tokenizers", [])],
        defaults=dict(defaults),
        output=data.get("output"),
        source=source,
        **{k: pipeline.get(k) for k in PIPELINE_KEYS if k != "name"},
    )


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a TOML recipe."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {p}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
    return parse_recipe(data, source=str(p))
