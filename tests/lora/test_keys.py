"""The own-layout LoRA grammar and the helpers converters are built from."""

from __future__ import annotations

import pytest
import torch

from difforge.errors import ConversionError
from difforge.lora import (
    bake_alpha,
    group_by_module,
    lora_inverse_renamer,
    lora_renamer,
    merge_parts,
    split_lora_key,
    split_parts,
)


@pytest.mark.parametrize(
    ("key", "want"),
    [
        ("a.b.lora_A.weight", ("a.b", "A")),
        ("a.b.lora_B.default.weight", ("a.b", "B")),
        ("lora_unet_x_y.lora_down.weight", ("lora_unet_x_y", "A")),
        ("x.lora_up.weight", ("x", "B")),
        ("x.lora.down.weight", ("x", "A")),
        ("x.lora_linear_layer.up.weight", ("x", "B")),
        ("lora_unet_x.alpha", ("lora_unet_x", "alpha")),
        ("x.lora_magnitude_vector", None),
        ("x.weight", None),
    ],
)
def test_split_lora_key(key, want):
    assert split_lora_key(key) == want


def test_renamers_round_trip():
    rename = lora_renamer(lambda m: {"img.q": "blocks.0.q"}.get(m), ("transformer.", ""))
    inverse = lora_inverse_renamer(lambda m: {"blocks.0.q": "img.q"}.get(m), "transformer.")
    assert rename("transformer.img.q.lora_B.default.weight") == "blocks.0.q.lora_B.weight"
    assert rename("img.q.alpha") == "blocks.0.q.alpha"
    assert rename("other.lora_A.weight") is None
    assert inverse("blocks.0.q.lora_A.weight") == "transformer.img.q.lora_A.weight"
    assert inverse("blocks.0.q.lora_rows") is None


def _group(rank: int, out: int, seed: int, alpha: float | None = None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    g = {"A": torch.randn(rank, 8, generator=gen), "B": torch.randn(out, rank, generator=gen)}
    if alpha is not None:
        g["alpha"] = torch.tensor(alpha)
    return g


def _dense(group: dict, rows: int) -> torch.Tensor:
    """The delta as a full ``[rows, in]`` matrix, scale included."""
    scale = 1.0 if group.get("alpha") is None else float(group["alpha"]) / group["A"].shape[0]
    start = 0 if group.get("rows") is None else int(group["rows"][0])
    out = torch.zeros(rows, group["A"].shape[1])
    delta = group["B"] @ group["A"] * scale
    out[start : start + delta.shape[0]] = delta
    return out


@pytest.mark.parametrize("alphas", [(4.0, 4.0, 4.0), (1.0, 2.0, None)], ids=["same-scale", "mixed"])
def test_merge_then_split_is_exact(alphas):
    parts = [(0, _group(2, 8, 1, alphas[0])), (8, _group(3, 8, 2, alphas[1])), (16, _group(2, 8, 3, alphas[2]))]
    merged = merge_parts(parts)
    assert merged["A"].shape == (7, 8) and merged["B"].shape == (24, 7)
    assert torch.allclose(_dense(merged, 24), sum(_dense({**g, "rows": torch.tensor([o, o + 8])}, 24) for o, g in parts))
    split = split_parts(merged, [("q", 0, 8), ("k", 8, 16), ("v", 16, 24)])
    for (offset, g), name in zip(parts, "qkv"):
        assert split[name]["A"].shape[0] == g["A"].shape[0]  # each part keeps its own rank
        assert torch.allclose(_dense(split[name], 8), _dense(g, 8), atol=1e-6)


def test_merge_of_a_middle_part_and_split_of_a_dense_update():
    merged = merge_parts([(8, _group(2, 8, 1))])  # k only
    assert merged["rows"].tolist() == [8, 16]
    assert set(split_parts(merged, [("q", 0, 8), ("k", 8, 16), ("v", 16, 24)])) == {"k"}
    dense = _group(3, 24, 4)  # a LoRA trained on the fused weight: every part uses every rank
    split = split_parts(dense, [("q", 0, 8), ("k", 8, 16), ("v", 16, 24)])
    assert all(g["A"].shape[0] == 3 for g in split.values())
    assert torch.allclose(torch.cat([_dense(split[c], 8) for c in "qkv"]), _dense(dense, 24))


def test_bake_alpha_and_grammar_errors():
    g = _group(2, 4, 0, alpha=1.0)
    assert "alpha" not in bake_alpha(g) and torch.allclose(_dense(bake_alpha(g), 4), _dense(g, 4))
    with pytest.raises(ConversionError, match="not an own-layout LoRA key"):
        group_by_module({"x.lora_down.weight": torch.zeros(1)})
