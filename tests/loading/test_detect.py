"""Detection of the toy family: fingerprints, structure, converters, prefixes, misses, ambiguity."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import difforge
import difforge_sdk.toy
from difforge import ConverterSpec, ModelSpec
from difforge.errors import DetectionError, LoadError, UnknownNameError
from difforge.loading.detect import DetectionResult, detect
from difforge.plugins import PluginSettings
from difforge_sdk.toy import TOY1_FINGERPRINT
from difforge_sdk.toy.models import (
    TOY1_CONFIG,
    ToyDiT,
    ToyDiTConfig,
    ToyTextConfig,
    ToyTextEncoder,
    ToyVAE,
    ToyVAEConfig,
    is_toy_diffusers,
    toy_diffusers_fuse_qkv,
    toy_diffusers_rename,
)

from .loading_helpers import to_diffusers, toy_state_dict, write_safetensors, write_sparse_header

pytestmark = pytest.mark.usefixtures("toy_registry")


def _plugin(name: str, **hooks: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, fn)
    return module


def _rival_converters() -> Iterator[ConverterSpec]:
    yield ConverterSpec(
        name="toy-dit-diffusers-rival",
        source_format="toy-diffusers-rival",
        target_model="toy-dit",
        detect=is_toy_diffusers,
        rename=toy_diffusers_rename,
        transform=toy_diffusers_fuse_qkv,
    )


RIVAL = _plugin("rival_converter_plugin", difforge_register_converters=_rival_converters)


def test_own_layout_release(own_file: Path) -> None:
    r = detect(own_file)
    assert isinstance(r, DetectionResult)
    assert (r.model, r.family, r.role, r.format, r.variant, r.converter) == (
        "toy-dit",
        "toy",
        "dit",
        "toy",
        "Toy-1",
        None,
    )
    assert r.config == TOY1_CONFIG and r.fingerprint == TOY1_FINGERPRINT
    assert r.paths == (str(own_file),)
    d = r.as_dict()
    assert {"paths", "model", "family", "role", "format", "variant", "fingerprint", "config"} <= set(d)
    assert d["config"]["hidden_size"] == 32 and d["paths"] == [str(own_file)]
    json.dumps(d)


def test_fingerprint_api(own_file: Path, tmp_path: Path) -> None:
    sd = toy_state_dict()
    assert difforge.fingerprint(own_file) == TOY1_FINGERPRINT
    assert difforge.fingerprint({k: tuple(v.shape) for k, v in sd.items()}) == TOY1_FINGERPRINT
    keys = sorted(sd)
    a = write_safetensors(tmp_path / "a.safetensors", {k: sd[k] for k in keys[:10]})
    b = write_safetensors(tmp_path / "b.safetensors", {k: sd[k].half() for k in keys[10:]})  # dtype ignored
    assert difforge.fingerprint([a, b]) == TOY1_FINGERPRINT


def test_diffusers_layout_through_the_converter(diffusers_file: Path) -> None:
    r = detect(diffusers_file)
    assert (r.model, r.format, r.converter) == ("toy-dit", "toy-diffusers", "toy-dit-diffusers")
    assert r.variant == "Toy-1"  # its own-layout shapes are the release's
    assert r.config == TOY1_CONFIG
    assert r.fingerprint != TOY1_FINGERPRINT


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", "model."])
def test_wrapper_prefix_is_stripped(tmp_path: Path, prefix: str) -> None:
    sd = toy_state_dict()
    r = detect(write_safetensors(tmp_path / "comfy.safetensors", {prefix + k: v for k, v in sd.items()}))
    assert (r.model, r.format, r.variant, r.prefix) == ("toy-dit", "toy", "Toy-1", prefix)
    assert r.fingerprint == TOY1_FINGERPRINT
    r = detect(
        write_safetensors(tmp_path / "comfy-d.safetensors", {prefix + k: v for k, v in to_diffusers(sd).items()})
    )
    assert (r.model, r.format, r.prefix) == ("toy-dit", "toy-diffusers", prefix)


def test_shuffled_key_order(tmp_path: Path) -> None:
    sd = toy_state_dict()
    order = list(sd)
    random.Random(1).shuffle(order)
    r = detect(write_safetensors(tmp_path / "shuffled.safetensors", sd, order=order))
    assert (r.model, r.variant, r.fingerprint) == ("toy-dit", "Toy-1", TOY1_FINGERPRINT)


def test_modified_config_has_no_variant(tmp_path: Path) -> None:
    config = ToyDiTConfig(in_channels=8, hidden_size=48, num_heads=3, depth=3, text_dim=24, mlp_ratio=3)
    r = detect(write_safetensors(tmp_path / "finetune.safetensors", toy_state_dict(config)))
    assert (r.model, r.variant) == ("toy-dit", None)
    assert r.config == config
    r = detect(write_safetensors(tmp_path / "finetune-d.safetensors", to_diffusers(toy_state_dict(config))))
    assert (r.format, r.variant, r.config) == ("toy-diffusers", None, config)


def test_other_toy_models(tmp_path: Path) -> None:
    vae = ToyVAE(ToyVAEConfig(latent_channels=6)).state_dict()
    r = detect(write_safetensors(tmp_path / "vae.safetensors", vae))
    assert (r.model, r.role, r.config.latent_channels) == ("toy-vae", "vae", 6)
    te = ToyTextEncoder(ToyTextConfig(vocab_size=300, dim=8)).state_dict()
    r = detect(write_safetensors(tmp_path / "te.safetensors", te))
    assert (r.model, r.role, r.config.vocab_size, r.config.dim) == ("toy-text-encoder", "text_encoder", 300, 8)


def test_pickled_checkpoint(tmp_path: Path) -> None:
    torch.save({"state_dict": toy_state_dict()}, tmp_path / "toy.ckpt")
    r = detect(tmp_path / "toy.ckpt")
    assert (r.model, r.variant) == ("toy-dit", "Toy-1")


@pytest.mark.plugins([RIVAL])
def test_two_converters_claiming_a_file_is_an_error(diffusers_file: Path) -> None:
    with pytest.raises(DetectionError) as info:
        detect(diffusers_file)
    msg = str(info.value)
    assert "toy-dit-diffusers'" in msg and "toy-dit-diffusers-rival" in msg and "rival_converter_plugin" in msg
    assert "does not guess" in msg
    assert detect(diffusers_file, format="toy-diffusers").converter == "toy-dit-diffusers"


def test_miss_says_what_the_file_looks_like(tmp_path: Path) -> None:
    path = write_safetensors(
        tmp_path / "unknown.safetensors",
        {f"encoder.layers.{i}.{n}": torch.zeros(4, 4) for i in range(3) for n in ("q.weight", "k.weight")}
        | {"head.weight": torch.zeros(2, 4)},
    )
    with pytest.raises(DetectionError) as info:
        detect(path)
    msg = str(info.value)
    assert str(path) in msg and "7 tensors" in msg and "encoder.layers.0.k.weight [4, 4]" in msg
    assert "encoder (6)" in msg and "head (1)" in msg
    assert "No registered model shares key names" in msg and "difforge list models" in msg


def test_near_miss_names_the_nearest_model(tmp_path: Path) -> None:
    sd = toy_state_dict()
    del sd["final.linear.weight"], sd["final.linear.bias"]
    with pytest.raises(DetectionError, match=r"Nearest known models: toy-dit \(format 'toy': \d+% of its key patterns"):
        detect(write_safetensors(tmp_path / "pruned.safetensors", sd))


def test_model_and_format_filters(own_file: Path) -> None:
    assert detect(own_file, model="toy_dit").model == "toy-dit"
    with pytest.raises(DetectionError, match="as model 'toy-vae'"):
        detect(own_file, model="toy-vae")
    with pytest.raises(UnknownNameError, match="toy-dit"):
        detect(own_file, model="toy-ditt")


def test_diffusers_component_folder(tmp_path: Path) -> None:
    folder = tmp_path / "transformer"
    folder.mkdir()
    sd = to_diffusers(toy_state_dict())
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
        write_safetensors(folder / name, {k: sd[k] for k in part})
        weight_map |= {k: name for k in part}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"_class_name": "ToyTransformer"}))
    r = detect(folder)
    assert (r.model, r.format, r.variant, len(r.paths)) == ("toy-dit", "toy-diffusers", "Toy-1", 2)
    assert detect(sorted(folder.glob("*.safetensors"))).model == "toy-dit"
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LoadError, match="diffusion_pytorch_model-00002-of-00002.safetensors"):
        detect(folder)


def _json_config(config: dict[str, Any], shapes: Any) -> ToyDiTConfig | None:
    if config.get("_class_name") != "ToyTransformer":
        return None
    return ToyDiTConfig(hidden_size=config["hidden"], num_heads=config["heads"], depth=config["layers"])


def test_config_json_beside_the_weights(tmp_path: Path) -> None:
    toy_dit = next(s for s in difforge_sdk.toy.difforge_register_models() if getattr(s, "name", "") == "toy-dit")
    spec = dataclasses.replace(toy_dit, config_from_json=_json_config)
    difforge.reload_plugins(
        PluginSettings(autoload=False), plugins=[_plugin("json_toy", difforge_register_models=lambda: [spec])]
    )
    path = write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", toy_state_dict(ToyDiTConfig(depth=3)))
    assert detect(path).config.num_heads == 2  # inferred from shapes
    (tmp_path / "config.json").write_text(
        json.dumps({"_class_name": "ToyTransformer", "hidden": 32, "heads": 4, "layers": 3})
    )
    r = detect(path)
    assert (r.variant, r.config.num_heads, r.config.depth) == (None, 4, 3)
    release = write_safetensors(tmp_path / "release" / "m.safetensors", toy_state_dict())
    (tmp_path / "release" / "config.json").write_text((tmp_path / "config.json").read_text())
    assert (detect(release).variant, detect(release).config) == ("Toy-1", TOY1_CONFIG)  # the release's own config wins


def _tokenizer_folder(path: Path) -> dict[str, Any] | None:
    return {"kind": "toy"} if (path / "tokenizer.json").is_file() else None


def test_weightless_folder_through_detect_folder(tmp_path: Path) -> None:
    spec = ModelSpec(name="toy-tokenizer", family="toy", role="tokenizer", module="x:y", config_from_shapes=None,
                     format="tokenizer", detect_folder=_tokenizer_folder)  # fmt: skip
    difforge.reload_plugins(
        PluginSettings(autoload=False),
        plugins=[difforge_sdk.toy, _plugin("tok", difforge_register_models=lambda: [spec])],
    )
    (tmp_path / "tokenizer.json").write_text("{}")
    r = detect(tmp_path)
    assert (r.model, r.format, r.config) == ("toy-tokenizer", "folder", {"kind": "toy"})
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(DetectionError, match="without weight files"):
        detect(tmp_path)


# ---------------------------------------------------------------- real size, header only

XL = ToyDiTConfig(in_channels=16, hidden_size=3072, num_heads=192, depth=40, text_dim=4096, mlp_ratio=4)


@functools.lru_cache(maxsize=1)
def _xl_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in ToyDiT(XL).state_dict().items()}


def _read_bytes() -> int | None:
    try:
        return int(
            next(ln for ln in Path("/proc/self/io").read_text().splitlines() if ln.startswith("rchar")).split()[1]
        )
    except (OSError, StopIteration):
        return None


def test_real_size_sparse_file_is_detected_from_the_header(tmp_path: Path, own_file: Path) -> None:
    detect(own_file)  # warm up imports
    path = write_sparse_header(tmp_path / "xl.safetensors", _xl_shapes())
    size = path.stat().st_size
    assert size > 10 * 2**30  # a 13 GB checkpoint in name ...
    assert path.stat().st_blocks * 512 < 2**20  # ... and a hole on disk
    before, start = _read_bytes(), time.perf_counter()
    r = detect(path)
    elapsed = time.perf_counter() - start
    after = _read_bytes()
    assert (r.model, r.variant, r.config) == ("toy-dit", None, XL)
    assert elapsed < 0.5, f"detection of a 13 GB header took {elapsed:.2f}s"
    if before is not None and after is not None:
        assert after - before < 4 * 2**20  # the header, not the data


def test_real_size_release_is_detected_by_fingerprint(tmp_path: Path) -> None:
    shapes = _xl_shapes()
    fp = difforge.fingerprint(shapes)
    toy_dit = next(s for s in difforge_sdk.toy.difforge_register_models() if getattr(s, "name", "") == "toy-dit")
    xl = dataclasses.replace(toy_dit, name="toy-dit-xl", fingerprints={fp: "Toy-XL"}, released_configs={"Toy-XL": XL})
    difforge.reload_plugins(
        PluginSettings(autoload=False), plugins=[difforge_sdk.toy, _plugin("xl", difforge_register_models=lambda: [xl])]
    )
    path = write_sparse_header(tmp_path / "xl.safetensors", shapes)
    start = time.perf_counter()
    r = detect(path)  # toy-dit matches structurally too; the exact fingerprint decides
    assert time.perf_counter() - start < 1.0
    assert (r.model, r.variant, r.config, r.fingerprint) == ("toy-dit-xl", "Toy-XL", XL, fp)
    with pytest.raises(DetectionError, match="toy-dit in format 'toy'.*toy-dit-xl in format 'toy'"):
        detect(
            write_sparse_header(
                tmp_path / "xl2.safetensors",
                {k: v for k, v in shapes.items() if k != "text_embedder.bias"}
                | {"text_embedder.bias": (3072,), "extra": (1,)},
            )
        )
