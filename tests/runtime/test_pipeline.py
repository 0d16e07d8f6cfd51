"""Pipeline assembly and the shared runtime, exercised with the SDK's toy family."""

from __future__ import annotations

import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import difforge
from difforge import CacheSpec, ConfigError, ModelConfig, Pipeline, hookimpl
from difforge.runtime import current_cfg_branch
from difforge.runtime.recipe import Recipe, load_recipe
from difforge_sdk.toy.checkpoints import write_toy_checkpoints, write_toy_diffusers_folder

QUIET = {"progress_bar_cmd": lambda x: x}


# ------------------------------------------------------------ a test cache strategy


class _SkipOddSteps:
    """Replays each block's previous output on odd calls: changes results, and is removable."""

    def __init__(self, model: torch.nn.Module, layout: difforge.BlockLayout, options: dict) -> None:
        self.calls = 0
        self.handles = []
        self.memory: dict[tuple[str, int], torch.Tensor] = {}
        blocks = model.get_submodule(layout.groups[0].path)
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_hook(self._hook(i)))

    def _hook(self, index: int):
        def hook(module, args, output):
            key = (current_cfg_branch(), index)
            if index == 0:
                self.calls += 1
            if self.calls % 2 == 0 and key in self.memory:
                return self.memory[key]
            self.memory[key] = output
            return output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def reset(self) -> None:
        self.calls = 0
        self.memory.clear()

    def stats(self) -> dict:
        return {"calls": self.calls}


def _apply_skip(model, layout, options):
    return _SkipOddSteps(model, layout, options)


test_cache_plugin = types.ModuleType("difforge_test_cache_plugin")
test_cache_plugin.difforge_register_cache_strategies = hookimpl(
    lambda: [CacheSpec(name="skip-odd", apply=_apply_skip, options={"family": None})]
)


@pytest.fixture(autouse=True)
def toy_plugins():
    import difforge_sdk.toy

    difforge.reload_plugins(plugins=[difforge_sdk.toy, test_cache_plugin])
    yield
    difforge.reload_plugins()


@pytest.fixture
def toy_files(tmp_path: Path) -> dict[str, Path]:
    return write_toy_checkpoints(tmp_path / "toy")


def _configs(files: dict[str, Path]) -> list[ModelConfig]:
    return [ModelConfig(path=str(p)) for p in files.values()]


def _build(files, **kw) -> Pipeline:
    return Pipeline.from_pretrained("toy", model_configs=_configs(files), device="cpu", **kw)


# ------------------------------------------------------------ assembly


def test_routing_in_any_order(toy_files):
    configs = _configs(toy_files)
    random.Random(0).shuffle(configs)
    pipe = Pipeline.from_pretrained("toy", model_configs=configs[::-1], device="cpu")
    assert type(pipe).__name__ == "ToyPipeline"
    assert set(pipe.components) == {"dit", "vae", "text_encoder"}
    assert type(pipe.dit).__name__ == "ToyDiT"
    assert type(pipe.vae).__name__ == "ToyVAE"
    assert type(pipe.text_encoder).__name__ == "ToyTextEncoder"


def test_plain_paths_and_prefixed_foreign_format(tmp_path):
    files = write_toy_checkpoints(tmp_path, dit_format="toy-diffusers", prefix="model.diffusion_model.")
    pipe = Pipeline.from_pretrained("toy", model_configs=[str(p) for p in files.values()], device="cpu")
    ref = write_toy_checkpoints(tmp_path / "own")
    own = _build(ref)
    for k, v in own.dit.state_dict().items():
        assert torch.equal(v, pipe.dit.state_dict()[k]), k


def test_missing_component_fails_before_loading(toy_files, monkeypatch):
    import difforge.loading.load as load_mod

    def boom(*a, **k):
        raise AssertionError("weights were read before the missing component was reported")

    monkeypatch.setattr(load_mod, "load_model", boom)
    with pytest.raises(ConfigError) as err:
        Pipeline.from_pretrained("toy", model_configs=[ModelConfig(path=str(toy_files["dit"]))], device="cpu")
    msg = str(err.value)
    assert "missing required components" in msg and "vae" in msg and "text_encoder" in msg and "toy-dit" in msg


def test_extra_component_has_no_slot(toy_files, tmp_path):
    other = write_toy_checkpoints(tmp_path / "second", seed=1)
    with pytest.raises(ConfigError, match="no free slot"):
        _build({**toy_files, "dit2": other["dit"]})


def test_bad_plugin_names_fail_before_loading(toy_files, monkeypatch):
    import difforge.loading.load as load_mod

    monkeypatch.setattr(load_mod, "load_model", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(difforge.UnknownNameError, match="Did you mean 'sdpa'"):
        _build(toy_files, attention="sdpaa")
    with pytest.raises(difforge.UnknownNameError, match="cache strategy"):
        _build(toy_files, cache="nope")
    with pytest.raises(difforge.UnknownNameError, match="scheduler"):
        _build(toy_files, scheduler="flow-eulr")
    with pytest.raises(ConfigError, match="Did you mean 'shift'"):
        _build(toy_files, scheduler={"name": "flow-euler", "shfit": 3.0})
    with pytest.raises(ConfigError, match="needs a 'name'"):
        _build(toy_files, cache={"threshold": 0.1})


def test_diffusers_folder_and_its_scheduler(tmp_path):
    folder = write_toy_diffusers_folder(
        tmp_path / "toy-diffusers", scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.5}
    )
    pipe = Pipeline.from_pretrained("toy", str(folder), device="cpu")
    assert set(pipe.components) == {"dit", "vae", "text_encoder"}
    assert pipe.scheduler_choice.name == "flow-euler" and pipe.scheduler_choice.options["shift"] == 1.5
    image = pipe("a cat", seed=1, output_type="np", **QUIET)
    assert image.shape == (1, 32, 32, 3)


def test_default_scheduler_follows_detected_release(toy_files, tmp_path):
    pipe = _build(toy_files)
    assert pipe.variant == "Toy-1"
    assert dict(pipe.scheduler_choice.options) == {"shift": 2.0}  # variant_schedulers["Toy-1"]
    from difforge_sdk.toy.models import ToyDiTConfig

    tuned = write_toy_checkpoints(tmp_path / "tuned", dit_config=ToyDiTConfig(depth=3))
    pipe = _build(tuned)
    assert pipe.variant is None
    assert dict(pipe.scheduler_choice.options) == {"shift": 3.0}  # the pipeline default
    pipe = _build(toy_files, scheduler={"name": "flow-euler", "shift": 4.0})
    assert dict(pipe.scheduler_choice.options) == {"shift": 4.0}


# ------------------------------------------------------------ calls


def test_call_argument_checks_before_heavy_work(toy_files, monkeypatch):
    pipe = _build(toy_files)
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: pytest.fail("prompt encoded before checks"))
    for bad, match in [
        (dict(width=40), "multiple of 16"),
        (dict(height=0), "multiple of 16"),
        (dict(num_inference_steps=0), ">= 1"),
        (dict(denoising_strength=0.0), r"\(0, 1\]"),
        (dict(denoising_strength=1.5), r"\(0, 1\]"),
        (dict(denoising_strength=0.5), "input_image"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(seed=-1), "seed"),
        (dict(num_inference_step=3), "did you mean 'num_inference_steps'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            pipe("a cat", **bad, **QUIET)


def test_seed_reproducible_and_output_types(toy_files):
    pipe = _build(toy_files)
    a = pipe("a cat", seed=7, output_type="np", **QUIET)
    b = pipe("a cat", seed=7, output_type="np", **QUIET)
    c = pipe("a cat", seed=8, output_type="np", **QUIET)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == (1, 32, 32, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    pt = pipe("a cat", seed=7, output_type="pt", **QUIET)
    assert pt.shape == (1, 3, 32, 32) and np.allclose(pt.permute(0, 2, 3, 1).numpy(), a)
    lat = pipe("a cat", seed=7, output_type="latent", **QUIET)
    assert lat.shape == (1, 4, 4, 4)
    img = pipe("a cat", seed=7, **QUIET)
    assert img.size == (32, 32)
    batch = pipe(["a cat", "a dog"], seed=7, output_type="np", **QUIET)
    assert batch.shape == (2, 32, 32, 3)


def test_latents_passthrough_and_rand_device(toy_files):
    pipe = _build(toy_files)
    shape = (1, 4, 4, 4)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(3))
    assert torch.equal(pipe.noise(shape, 3, "cpu"), noise)
    from_seed = pipe("a cat", seed=3, output_type="np", rand_device="cpu", **QUIET)
    from_latents = pipe("a cat", latents=noise.clone(), output_type="np", **QUIET)
    assert np.array_equal(from_seed, from_latents)
    with pytest.raises(ConfigError, match="latents has shape"):
        pipe("a cat", latents=torch.randn(1, 4, 4, 4), height=64, width=64, **QUIET)


def test_rand_device_is_where_noise_is_drawn(toy_files, monkeypatch):
    pipe = _build(toy_files)
    seen = []
    real_randn, real_generator = torch.randn, torch.Generator

    def generator(device="cpu"):
        seen.append(("generator", str(device)))
        return real_generator("cpu")

    def randn(*args, **kw):
        seen.append(("randn", str(kw.pop("device"))))
        return real_randn(*args, **kw)

    monkeypatch.setattr(torch, "Generator", generator)
    monkeypatch.setattr(torch, "randn", randn)
    noise = pipe.noise((1, 4, 4, 4), 0, "cuda:1")
    assert seen == [("generator", "cuda:1"), ("randn", "cuda:1")]
    assert noise.device == pipe.device


def test_prompt_embeds_skip_the_text_encoder(toy_files, monkeypatch):
    pipe = _build(toy_files)
    embeds = pipe.encode_prompt(["a cat"])
    expected = pipe("a cat", seed=1, output_type="np", **QUIET)
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: pytest.fail("text encoder ran"))
    got = pipe(prompt_embeds=embeds, seed=1, output_type="np", **QUIET)
    assert np.array_equal(expected, got)


def test_callback_progress_and_step_hook(toy_files):
    pipe = _build(toy_files)
    steps, bars = [], []

    def callback(p, i, t, latents):
        steps.append((i, float(t)))
        return None

    def bar(iterable):
        bars.append(1)
        return iterable

    pipe("a cat", seed=0, num_inference_steps=5, callback=callback, progress_bar_cmd=bar)
    assert [i for i, _ in steps] == [0, 1, 2, 3, 4]
    assert bars == [1]
    ts = [t for _, t in steps]
    assert ts == sorted(ts, reverse=True)

    # a callback may replace latents
    zeros = pipe("a cat", seed=0, output_type="latent", callback=lambda p, i, t, x: torch.zeros_like(x), **QUIET)
    assert torch.count_nonzero(zeros) == 0


def test_classifier_free_guidance_runs_both_branches(toy_files, monkeypatch):
    pipe = _build(toy_files)
    branches = []
    real = pipe.predict

    def spy(latents, t, cond, **kw):
        branches.append(current_cfg_branch())
        return real(latents, t, cond, **kw)

    monkeypatch.setattr(pipe, "predict", spy)
    off = pipe("a cat", seed=0, num_inference_steps=3, output_type="np", **QUIET)
    assert branches == ["cond"] * 3
    branches.clear()
    on = pipe("a cat", negative_prompt="blurry", cfg_scale=4.0, seed=0, num_inference_steps=3, output_type="np", **QUIET)
    assert branches == ["cond", "uncond"] * 3
    assert not np.array_equal(off, on)


def test_img2img_uses_the_input_image(toy_files):
    pipe = _build(toy_files)
    from PIL import Image

    src = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    steps = []
    out = pipe(
        "a cat", input_image=src, denoising_strength=0.5, num_inference_steps=4, seed=0, output_type="np",
        callback=lambda p, i, t, x: steps.append(i), progress_bar_cmd=lambda x: x,
    )
    assert out.shape == (1, 32, 32, 3)
    assert 1 <= len(steps) < 4
    txt2img = pipe("a cat", num_inference_steps=4, seed=0, output_type="np", **QUIET)
    assert not np.array_equal(out, txt2img)


def test_swapping_cache_and_attention_is_reversible(toy_files):
    fresh = _build(toy_files)
    expected = fresh("a cat", seed=5, output_type="np", **QUIET)

    pipe = _build(toy_files, cache="skip-odd", attention="math")
    cached = pipe("a cat", seed=5, output_type="np", **QUIET)
    assert not np.array_equal(cached, expected)
    assert pipe.cache_stats() and pipe.cache_stats()[0]["calls"] > 0
    pipe.set_cache(None)
    pipe.set_attention("sdpa")
    assert np.array_equal(pipe("a cat", seed=5, output_type="np", **QUIET), expected)
    pipe.set_cache({"name": "skip-odd"})
    pipe.set_attention("math")
    assert np.array_equal(pipe("a cat", seed=5, output_type="np", **QUIET), cached)


def test_attention_choice_reaches_the_op(toy_files, monkeypatch):
    import difforge.builtin.attention as builtin_attention
    attention_mod = sys.modules["difforge.ops.attention"]

    used = []
    real = builtin_attention.math_attention

    def spy(*a, **k):
        used.append("math")
        return real(*a, **k)

    monkeypatch.setattr(attention_mod, "_cache", {})
    monkeypatch.setattr(builtin_attention, "math_attention", spy)
    monkeypatch.setattr(difforge._names, "_resolved", {})
    pipe = _build(toy_files, attention="math")
    pipe("a cat", seed=0, num_inference_steps=1, **QUIET)
    assert used


# ------------------------------------------------------------ recipes and CLI


def test_recipe_round_trip(toy_files, tmp_path):
    recipe = Recipe(
        name="toy",
        models=[{"path": str(p)} for p in toy_files.values()],
        device="cpu",
        torch_dtype="float32",
        attention="sdpa",
        cache={"name": "skip-odd"},
        scheduler={"name": "flow-euler", "shift": 2.5},
        defaults={"prompt": "a red fox", "num_inference_steps": 3, "seed": 11, "height": 48, "width": 32},
        output="fox.png",
    )
    path = tmp_path / "toy.toml"
    recipe.save(path)
    loaded = load_recipe(path)
    assert loaded.to_toml() == recipe.to_toml()
    loaded.source = None
    recipe.source = None
    assert loaded == recipe

    pipe = Pipeline.from_recipe(path)
    assert pipe.cache_choice.name == "skip-odd" and pipe.attention == "sdpa"
    assert dict(pipe.scheduler_choice.options) == {"shift": 2.5}
    image = pipe(output_type="np", **QUIET)  # prompt, size and steps from [defaults]
    assert image.shape == (1, 48, 32, 3)


def test_bad_recipes(tmp_path):
    cases = {
        "nopipe.toml": ("[defaults]\nseed = 1\n", "needs a \\[pipeline\\]"),
        "badkey.toml": ("[pipeline]\nname = 'toy'\ncolour = 'red'\n", "unknown \\[pipeline\\] keys"),
        "syntax.toml": ("[pipeline\nname = 'toy'\n", "not valid TOML"),
        "dtype.toml": ("[pipeline]\nname = 'toy'\ntorch_dtype = 'float8'\n", "torch_dtype"),
    }
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_recipe(tmp_path / name)


def test_cli_generate_and_run(toy_files, tmp_path, monkeypatch, capsys):
    from difforge.cli import main

    monkeypatch.setenv("DIFFORGE_PLUGINS", "difforge_sdk.toy")
    difforge.reload_plugins()
    out = tmp_path / "cli.png"
    args = ["generate", "toy", "--prompt", "a cat", "--seed", "1", "--steps", "2", "--device", "cpu", "-o", str(out)]
    for p in toy_files.values():
        args += ["--model", str(p)]
    assert main(args) == 0
    assert out.is_file()

    recipe = Recipe(name="toy", models=[{"path": str(p)} for p in toy_files.values()], device="cpu",
                    defaults={"prompt": "a cat", "num_inference_steps": 2, "seed": 1})
    recipe.save(tmp_path / "r.toml")
    out2 = tmp_path / "run.png"
    assert main(["run", str(tmp_path / "r.toml"), "-o", str(out2)]) == 0
    assert out2.read_bytes() == out.read_bytes()

    capsys.readouterr()
    assert main(["generate", "toy", "--prompt", "x", "--width", "40", "--device", "cpu", "--model", str(toy_files["dit"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("difforge: error:") and len(err.strip().splitlines()) == 1


def test_default_sources_from_a_model_id(tmp_path, monkeypatch):
    """With no files, or only a model id, the pipeline's default sources are fetched (here: found
    already downloaded under DIFFORGE_MODEL_BASE_PATH, with downloads skipped)."""
    write_toy_checkpoints(tmp_path / "models" / "difforge" / "Toy-1")
    monkeypatch.setenv("DIFFORGE_MODEL_BASE_PATH", str(tmp_path / "models"))
    monkeypatch.setenv("DIFFORGE_SKIP_DOWNLOAD", "1")
    pipe = Pipeline.from_pretrained("toy", device="cpu")
    assert set(pipe.components) == {"dit", "vae", "text_encoder"} and pipe.variant == "Toy-1"
    pipe = Pipeline.from_pretrained("toy", [ModelConfig(model_id="difforge/Toy-1")], device="cpu")
    assert set(pipe.components) == {"dit", "vae", "text_encoder"}


def test_default_sources_go_through_the_hub_client(tmp_path, monkeypatch):
    """Nothing local: the configured hub client (ModelScope by default) is asked for each source file."""
    import sys
    import types

    src = write_toy_checkpoints(tmp_path / "hub")
    calls = []

    def snapshot_download(model_id, revision=None, local_dir=None, allow_patterns=None, **kw):
        calls.append((model_id, tuple(allow_patterns or ())))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for pattern in allow_patterns or ():
            for p in src.values():
                if p.name == pattern:
                    (Path(local_dir) / p.name).write_bytes(p.read_bytes())
        return local_dir

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=snapshot_download))
    monkeypatch.setenv("DIFFORGE_MODEL_BASE_PATH", str(tmp_path / "models"))
    monkeypatch.delenv("DIFFORGE_SKIP_DOWNLOAD", raising=False)
    pipe = Pipeline.from_pretrained("toy", device="cpu")
    assert sorted(calls) == [("difforge/Toy-1", (n,)) for n in ("dit.safetensors", "text_encoder.safetensors", "vae.safetensors")]
    assert pipe.variant == "Toy-1"


def test_offload_applied_in_order_and_removable(toy_files):
    """dtype backends before location backends; set_offload swaps them and back, bit for bit."""
    plain = _build(toy_files)
    expected = plain("a cat", seed=2, output_type="np", **QUIET)
    pipe = _build(toy_files, offload=["sequential", "fp8"], cache="skip-odd")
    kinds = [difforge.get_registry().offload.get(c.name).kind for c in pipe.offload_choices]
    assert sorted(kinds) == ["dtype", "location"]
    assert pipe("a cat", seed=2, output_type="np", **QUIET).shape == expected.shape
    pipe.set_offload(None)
    pipe.set_cache(None)
    assert np.array_equal(pipe("a cat", seed=2, output_type="np", **QUIET), expected)
    pipe.set_offload("disk")
    assert np.array_equal(pipe("a cat", seed=2, output_type="np", **QUIET), expected)
    pipe.set_offload([])
    with pytest.raises(difforge.UnknownNameError):
        pipe.set_offload("dsk")


def test_cli_generate_from_a_diffusers_folder(tmp_path, monkeypatch):
    from difforge.cli import main

    folder = write_toy_diffusers_folder(tmp_path / "toy-diffusers")
    monkeypatch.setenv("DIFFORGE_PLUGINS", "difforge_sdk.toy")
    difforge.reload_plugins()
    out = tmp_path / "folder.png"
    args = ["generate", "toy", "--prompt", "a cat", "--steps", "2", "--device", "cpu", "--model", str(folder), "-o", str(out)]
    assert main(args) == 0 and out.is_file()


def test_variant_is_the_denoisers(toy_files):
    """Encoders are shared between releases: only the DiT's fingerprint names the release."""
    import dataclasses

    pipe = _build(toy_files)
    assert pipe.variant == "Toy-1"
    pipe.detections["text_encoder"] = dataclasses.replace(pipe.detections["text_encoder"], variant="Shared-Encoder")
    pipe.detections["dit"] = dataclasses.replace(pipe.detections["dit"], variant=None)
    assert pipe.variant is None
