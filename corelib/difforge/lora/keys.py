"""The own-layout LoRA key grammar, and helpers for the LoRA converters family plugins write.

A LoRA converter (``ConverterSpec(kind="lora")``) turns a LoRA file's keys into the **own layout**
of its target model: for every module (dotted path in the model, e.g. ``double_blocks.0.img_attn.qkv``)

- ``{module}.lora_A.weight``: the down projection, ``[r, in]`` (``[r, in, *kernel]`` for convolutions);
- ``{module}.lora_B.weight``: the up projection, ``[n, r]`` (trailing 1s allowed);
- ``{module}.alpha`` (optional, a scalar): the delta is scaled by ``alpha / r``; without it by 1;
- ``{module}.lora_rows`` (optional, int ``[start, stop]``): the delta covers only output rows
  ``start:stop`` of the module's weight (``n == stop - start``), for LoRAs that train part of a
  fused weight (q, k and v of a fused ``qkv``).

The delta of a module is ``scale * alpha / r * B @ A``. :func:`merge_parts` builds one such entry
from separate LoRAs on the parts of a fused weight (a block-structured update of rank ``sum r_i``:
the downs concatenated, the ups placed block-diagonally), and :func:`split_parts` goes back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..errors import ConversionError

__all__ = [
    "PEFT_SUFFIXES",
    "KOHYA_SUFFIXES",
    "split_lora_key",
    "own_key",
    "parse_own_key",
    "lora_renamer",
    "lora_inverse_renamer",
    "claims_any",
    "group_by_module",
    "ungroup",
    "merge_parts",
    "split_parts",
    "bake_alpha",
    "require_whole_rows",
]

Group = dict[str, Any]
"""One module's LoRA tensors by role: ``A``, ``B``, and optionally ``alpha`` and ``rows``."""

_OWN_SUFFIXES = {"A": "lora_A.weight", "B": "lora_B.weight", "alpha": "alpha", "rows": "lora_rows"}
_OWN = re.compile(r"^(?P<m>.+)\.(?P<s>lora_A\.weight|lora_B\.weight|alpha|lora_rows)$")
_ROLE_OF = {v: k for k, v in _OWN_SUFFIXES.items()}

PEFT_SUFFIXES = {"A": "lora_A.weight", "B": "lora_B.weight", "alpha": "alpha"}
"""diffusers/PEFT spelling of the roles (``X.lora_A.weight``)."""
KOHYA_SUFFIXES = {"A": "lora_down.weight", "B": "lora_up.weight", "alpha": "alpha"}
"""kohya/sd-scripts spelling (``X.lora_down.weight``, ``X.alpha``)."""

_FOREIGN = re.compile(
    r"^(?P<m>.+?)\.(?P<r>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up"
    r"|lora_linear_layer\.down|lora_linear_layer\.up)"
    r"(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?\.weight$"
)
_FOREIGN_ROLES = {"lora_A": "A", "lora_down": "A", "lora.down": "A", "lora_linear_layer.down": "A"}


def split_lora_key(key: str) -> tuple[str, str] | None:
    """``(module, role)`` of a LoRA key in any common spelling, role ``A``, ``B`` or ``alpha``.

    Recognised: ``X.lora_A.weight`` / ``X.lora_B.weight`` (diffusers/PEFT, also with an adapter name:
    ``X.lora_A.default.weight``), ``X.lora_down.weight`` / ``X.lora_up.weight`` (kohya),
    ``X.lora.down.weight``, ``X.lora_linear_layer.down.weight`` and ``X.alpha``. None otherwise
    (DoRA magnitudes, LoKr/LoHa factors, ``diff``/``diff_b`` full deltas are not LoRA keys).
    """
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    m = _FOREIGN.match(key)
    if m is None:
        return None
    return m["m"], _FOREIGN_ROLES.get(m["r"], "B")


def own_key(module: str, role: str) -> str:
    """The own-layout key of ``module``'s tensor ``role`` (``A``, ``B``, ``alpha``, ``rows``)."""
    return f"{module}.{_OWN_SUFFIXES[role]}"


def parse_own_key(key: str) -> tuple[str, str] | None:
    """``(module, role)`` of an own-layout key, None when ``key`` is not one."""
    m = _OWN.match(key)
    return None if m is None else (m["m"], _ROLE_OF[m["s"]])


def lora_renamer(
    module_map: Callable[[str], str | None], prefixes: Sequence[str] = ("",)
) -> Callable[[str], str | None]:
    """A converter ``rename``: strip one of ``prefixes`` (``""`` makes the prefix optional), split the
    key with :func:`split_lora_key`, map the module with ``module_map`` (None: not this format's)."""

    def rename(key: str) -> str | None:
        parsed = split_lora_key(key)
        if parsed is None:
            return None
        module, role = parsed
        for prefix in prefixes:
            if module.startswith(prefix) and (own := module_map(module[len(prefix) :])) is not None:
                return own_key(own, role)
        return None

    return rename


def lora_inverse_renamer(
    module_inverse: Callable[[str], str | None], prefix: str = "", suffixes: Mapping[str, str] = PEFT_SUFFIXES
) -> Callable[[str], str | None]:
    """A converter ``inverse_rename``: own-layout key -> ``prefix`` + foreign module + suffix of its role.

    Row ranges (``lora_rows``) have no foreign spelling: the exporter pads ``lora_B`` to whole rows first.
    """

    def inverse(key: str) -> str | None:
        parsed = parse_own_key(key)
        if parsed is None or parsed[1] not in suffixes:
            return None
        module = module_inverse(parsed[0])
        return None if module is None else f"{prefix}{module}.{suffixes[parsed[1]]}"

    return inverse


def claims_any(rename: Callable[[str], str | None], keys: Iterable[str], ignore: Iterable[str] = ()) -> bool:
    """Whether ``rename`` maps at least one of ``keys`` to an own module not in ``ignore``
    (modules several formats spell alike, which therefore prove nothing)."""
    ignored = set(ignore)
    for key in keys:
        new = rename(key)
        if new is not None and (parse_own_key(new) or ("", ""))[0] not in ignored:
            return True
    return False


def group_by_module(sd: Mapping[str, Any], what: str = "LoRA") -> dict[str, Group]:
    """``{module: {role: tensor}}`` of an own-layout LoRA state dict (a key outside the grammar is an error)."""
    groups: dict[str, Group] = {}
    for key, value in sd.items():
        parsed = parse_own_key(key)
        if parsed is None:
            raise ConversionError(
                f"{what}: {key!r} is not an own-layout LoRA key (module.lora_A.weight, module.lora_B.weight, "
                "module.alpha, module.lora_rows); the LoRA converter's rename/transform produced it"
            )
        groups.setdefault(parsed[0], {})[parsed[1]] = value
    return groups


def ungroup(groups: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The inverse of :func:`group_by_module`."""
    return {own_key(module, role): value for module, g in groups.items() for role, value in g.items()}


def _scale(group: Mapping[str, Any]) -> float:
    alpha = group.get("alpha")
    return 1.0 if alpha is None else float(alpha) / group["A"].shape[0]


def _rows(group: Mapping[str, Any]) -> tuple[int, int] | None:
    rows = group.get("rows")
    return None if rows is None else (int(rows[0]), int(rows[1]))


def merge_parts(parts: Sequence[tuple[int, Mapping[str, Any]]]) -> Group:
    """One LoRA entry from LoRAs on parts of a fused weight: ``parts`` are ``(row offset, group)``.

    The result has rank ``sum r_i``: ``A`` the downs concatenated, ``B`` the ups placed at their row
    offsets in their own columns (block-diagonal for adjacent parts), ``rows`` the range covered.
    Equal per-part scales become one ``alpha``; different ones are folded into the ups.
    """
    import torch

    scales = [_scale(g) for _, g in parts]
    start = min(off for off, _ in parts)
    stop = max(off + g["B"].shape[0] for off, g in parts)
    rank = sum(g["A"].shape[0] for _, g in parts)
    first = parts[0][1]["B"]
    B = first.new_zeros((stop - start, rank, *first.shape[2:]))
    col = 0
    same = all(s == scales[0] for s in scales)
    for (off, g), s in zip(parts, scales):
        up = g["B"].reshape(g["B"].shape[0], g["B"].shape[1], *first.shape[2:])
        r = g["A"].shape[0]
        B[off - start : off - start + up.shape[0], col : col + r] = up if same else up * s
        col += r
    out: Group = {"A": torch.cat([g["A"] for _, g in parts], dim=0), "B": B}
    if same and scales[0] != 1.0:
        out["alpha"] = torch.tensor(scales[0] * rank)
    out["rows"] = torch.tensor([start, stop], dtype=torch.int64)
    return out


def split_parts(group: Mapping[str, Any], parts: Sequence[tuple[str, int, int | None]]) -> dict[str, Group]:
    """Split an entry on a fused weight into entries on its parts ``(name, start, stop)`` (row ranges
    of the fused weight; ``stop`` None: to the end of the entry). Exact: where the columns of ``B``
    used by the parts are disjoint (a :func:`merge_parts` result) each part keeps only its own rank;
    otherwise every part gets the whole ``A`` and its rows of ``B``. Parts left at zero are omitted."""
    import torch

    A, B = group["A"], group["B"]
    first, end = _rows(group) or (0, B.shape[0])
    pieces: list[tuple[str, Any, Any]] = []
    for name, s, e in parts:
        e = end if e is None else e
        lo, hi = max(s, first), min(e, end)
        if lo >= hi:
            continue
        rows = B.new_zeros((e - s, *B.shape[1:]))
        rows[lo - s : hi - s] = B[lo - first : hi - first]
        used = rows.reshape(rows.shape[0], rows.shape[1], -1).ne(0).any(dim=2).any(dim=0)
        if bool(used.any()):
            pieces.append((name, rows, used))
    used_cols = [u for _, _, u in pieces]
    disjoint = not pieces or sum(int(u.sum()) for u in used_cols) == int(torch.stack(used_cols).any(0).sum())
    out: dict[str, Group] = {}
    for name, rows, used in pieces:
        cols = used.nonzero().flatten()
        g: Group = {"A": A[cols], "B": rows[:, cols]} if disjoint else {"A": A, "B": rows}
        if group.get("alpha") is not None:
            g["alpha"] = torch.tensor(_scale(group) * g["A"].shape[0])
        out[name] = g
    return out


def bake_alpha(group: Mapping[str, Any]) -> Group:
    """The same delta without ``alpha``: its ``alpha / r`` folded into ``B`` (for formats without alpha)."""
    out = dict(group)
    alpha = out.pop("alpha", None)
    if alpha is not None:
        out["B"] = out["B"] * (float(alpha) / out["A"].shape[0])
    return out


def require_whole_rows(groups: Mapping[str, Mapping[str, Any]], fmt: str) -> None:
    """Raise when an entry covers part of a weight's rows: ``fmt`` has no way to say so."""
    partial = sorted(m for m, g in groups.items() if g.get("rows") is not None)
    if partial:
        raise ConversionError(
            f"the {fmt} LoRA format cannot express a LoRA on part of a weight's rows ({', '.join(partial[:5])}"
            f"{' ...' if len(partial) > 5 else ''}); load the LoRA into a pipeline and use pipe.export_lora, which "
            "knows the weights' sizes, or export to a format with separate q/k/v (diffusers)"
        )
