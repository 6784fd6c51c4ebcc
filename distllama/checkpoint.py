"""Checkpoint access: find a Hugging Face safetensors checkpoint and read only the slices a rank needs.

Owns where a checkpoint lives (local folder or hub id in the HF cache), which shard file holds each
tensor, fetching only the shards a rank asks for, and sliced reads with a byte count. It does not decide
which tensors or slices a rank needs; the model code does. Safetensors only: nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath

import torch
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.utils import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    validate_repo_id,
)
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Everything resolve_checkpoint fetches for a hub id; weights come later, per rank, via ensure_files().
# The chat template files are what the tokenizer reads besides tokenizer_config.json (Transformers 5 saves
# chat_template.jinja on its own).
METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    INDEX_FILE,
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, trusted or read; the message is one user-facing line."""


def is_local_checkpoint(model: str) -> bool:
    return pathlib.Path(model).expanduser().is_dir()


def resolve_checkpoint(model: str, revision: str | None = None) -> Checkpoint:
    """Local folder: used as is. Otherwise a hub id ("org/name") whose metadata files (never weights)
    are fetched into the HF cache; HF_HUB_OFFLINE, HF_HOME and HF_HUB_CACHE are read at call time."""
    if is_local_checkpoint(model):
        root = pathlib.Path(model).expanduser().resolve()
        if not (root / "config.json").is_file():
            raise CheckpointError(f"{model}: no config.json in this folder, not a Hugging Face checkpoint")
        return _checkpoint_from_files(root, model, sorted(p.name for p in root.iterdir()), hub=None)
    if not _is_hub_id(model):
        raise CheckpointError(f"{model}: neither an existing folder nor a hub id of the form org/name")

    hub = _HubRepo.open(model, revision)  # fetches config.json, which every checkpoint must have
    fetched = [name for name in METADATA_FILES if hub.fetch(name, optional=True) is not None]
    # the listing too where an index was fetched: Transformers takes model.safetensors over an index beside it
    files = fetched + hub.list_files()
    return _checkpoint_from_files(hub.snapshot, model, files, hub=hub)


def hub_files_for_rank(checkpoint_or_index: Checkpoint | dict, names: Iterable[str]) -> list[str]:
    """Sorted shard file names holding `names`, from a Checkpoint, an index dict or a bare weight map."""
    if isinstance(checkpoint_or_index, Checkpoint):
        weight_map = checkpoint_or_index.weight_map()
    else:
        weight_map = checkpoint_or_index.get("weight_map", checkpoint_or_index)
    files = set()
    for name in names:
        if name not in weight_map:
            raise CheckpointError(f"tensor {name} is not in the checkpoint")
        files.add(weight_map[name])
    return sorted(files)


class Checkpoint:
    """One safetensors checkpoint: its weight map, lazily opened shards, sliced reads and their byte count."""

    def __init__(
        self,
        root: pathlib.Path,
        *,
        weight_map: dict[str, str] | None = None,
        total_size: int | None = None,
        single_file: str | None = None,
        hub: _HubRepo | None = None,
    ):
        # Either an index gave the weight map, or one file's header will, on first use.
        assert (weight_map is None) != (single_file is None), "need a weight map or a single file"
        self.root = root
        self.hub_id = hub.repo_id if hub else None
        self.bytes_read = 0
        self.files_opened: set[str] = set()
        self._weight_map = weight_map
        self._total_size = total_size
        self._single_file = single_file
        self._hub = hub
        self._handles: dict = {}

    def weight_map(self) -> dict[str, str]:
        if self._weight_map is None:
            with _reading(self._single_file):
                self._weight_map = dict.fromkeys(self._open(self._single_file).keys(), self._single_file)
        return self._weight_map

    def tensor_names(self) -> list[str]:
        return list(self.weight_map())

    def files_for(self, names: Iterable[str]) -> list[str]:
        return hub_files_for_rank(self.weight_map(), names)

    def ensure_files(self, files: list[str]) -> None:
        """Make these shard files present locally: hub ids download exactly these, folders must hold them."""
        for file in files:
            if self._hub is not None:
                self._hub.fetch(file)
            self._checked_path(file)

    def shape(self, name: str) -> tuple[int, ...]:
        with _reading(self.weight_map().get(name), name):
            return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype code from the shard header, e.g. "F32" or "BF16"."""
        with _reading(self.weight_map().get(name), name):
            return self._slice(name).get_dtype()

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The whole tensor (dim None) or [start:stop) along dim 0 or 1; get_slice reads only that slice."""
        with _reading(self.weight_map().get(name), name):
            tensor_slice = self._slice(name)
            shape = tensor_slice.get_shape()
            if dim is None:
                tensor = tensor_slice[...]
            else:
                if dim not in (0, 1) or dim >= len(shape):
                    raise CheckpointError(f"cannot slice {name} of shape {tuple(shape)} along dim {dim}")
                stop = shape[dim] if stop is None else stop
                if not 0 <= start < stop <= shape[dim]:
                    raise CheckpointError(
                        f"slice [{start}:{stop}] along dim {dim} is out of range for {name} of shape {tuple(shape)}"
                    )
                tensor = tensor_slice[start:stop] if dim == 0 else tensor_slice[:, start:stop]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def total_bytes(self) -> int:
        """Sum of tensor sizes: the index's total_size when given, else from the shard headers."""
        if self._total_size is None:
            files = sorted(set(self.weight_map().values()))
            self.ensure_files(files)
            self._total_size = sum(_header_tensor_bytes(self._checked_path(file)) for file in files)
        return self._total_size

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)  # safe_open has no close(); its context exit unmaps the file
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _slice(self, name: str):
        file = self.weight_map().get(name)
        if file is None:
            raise CheckpointError(f"tensor {name} is not in the checkpoint")
        handle = self._open(file, needed_for=name)
        if name not in handle.keys():
            raise CheckpointError(f"shard file {file} has no tensor {name}, though the index says it does")
        return handle.get_slice(name)

    def _open(self, file: str, needed_for: str | None = None):
        if file not in self._handles:
            if self._hub is not None:
                self._hub.fetch(file)
            path = self._checked_path(file, needed_for)
            with _reading(file, needed_for):
                self._handles[file] = safe_open(str(path), framework="pt")
            self.files_opened.add(file)
        return self._handles[file]

    def _checked_path(self, file: str, needed_for: str | None = None) -> pathlib.Path:
        """The shard's path, once it is known to exist inside the checkpoint (symlinks included)."""
        path = self.root / _safe_relative_name(file)
        if not path.is_file():
            needed = needed_for or next((n for n, f in (self._weight_map or {}).items() if f == file), None)
            raise CheckpointError(f"missing shard file {file}" + (f" (needed for {needed})" if needed else ""))
        if not path.resolve().is_relative_to(_trusted_folder(self.root)):
            raise CheckpointError(f"shard file {file} resolves outside the checkpoint folder {self.root}")
        return path


def _checkpoint_from_files(root: pathlib.Path, model: str, files: list[str], hub: _HubRepo | None) -> Checkpoint:
    """Pick the weight source the way Transformers does: model.safetensors if present (also beside an index, as a
    folder re-saved as one file keeps its old shards and index), else the index, else the one safetensors file."""
    if SINGLE_FILE in files:
        return Checkpoint(root, single_file=SINGLE_FILE, hub=hub)
    if INDEX_FILE in files:
        weight_map, total_size = _parse_index(root / INDEX_FILE)
        return Checkpoint(root, weight_map=weight_map, total_size=total_size, hub=hub)
    safetensors_files = sorted(f for f in files if f.endswith(".safetensors"))
    if len(safetensors_files) == 1:
        return Checkpoint(root, single_file=safetensors_files[0], hub=hub)
    if safetensors_files:
        raise CheckpointError(f"{model}: several *.safetensors files but no {INDEX_FILE} to map tensors to them")
    where = " in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if hub and hub.offline else ""
    raise CheckpointError(f"{model}: no *.safetensors weights found{where}; only safetensors checkpoints are supported")


def _parse_index(path: pathlib.Path) -> tuple[dict[str, str], int | None]:
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read the index as JSON ({error})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: the index has no weight_map")
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise CheckpointError(f"{path}: weight_map entry for {name} is not a file name")
        _safe_relative_name(file)  # reject escaping names now, before anything is downloaded or opened
    metadata = index.get("metadata") or {}
    total_size = metadata.get("total_size") if isinstance(metadata, dict) else None
    if total_size is not None and (not isinstance(total_size, (int, float)) or isinstance(total_size, bool)):
        raise CheckpointError(f"{path}: metadata.total_size must be a number of bytes, got {total_size!r}")
    return weight_map, int(total_size) if total_size is not None else None


def _safe_relative_name(file: str) -> PurePosixPath:
    """Index file names come from the checkpoint author: keep them plain, relative and inside the folder."""
    name = PurePosixPath(file)
    if not file or "\\" in file or name.is_absolute() or ".." in name.parts or pathlib.Path(file).is_absolute():
        raise CheckpointError(f"shard file name {file!r} is not a plain name inside the checkpoint folder")
    return name


def _trusted_folder(root: pathlib.Path) -> pathlib.Path:
    """Where shard symlinks may point: the folder itself, or for an HF cache snapshot the repo's cache
    folder, whose snapshots/<commit>/ entries are symlinks to ../../blobs/."""
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent.resolve()
    return root.resolve()


@contextmanager
def _reading(file: str | None, tensor: str | None = None):
    """A shard that safetensors (or the disk) cannot read: say which file, and which tensor was being read."""
    try:
        yield
    except (SafetensorError, OSError) as error:
        reason = " ".join((getattr(error, "strerror", None) or str(error)).split())
        what = f"shard file {file}" + (f" (reading {tensor})" if tensor else "")
        raise CheckpointError(f"{what} cannot be read: {reason}; is it truncated or damaged?") from None


_MAX_HEADER = 100_000_000  # bytes; safetensors itself refuses larger headers


def _header_tensor_bytes(path: pathlib.Path) -> int:
    """Bytes of tensor data in a safetensors file, from its header (8-byte length, then JSON)."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= min(_MAX_HEADER, path.stat().st_size - 8):
                raise ValueError(f"its header claims {length} bytes")
            header = json.loads(f.read(length))
        tensors = (entry for key, entry in header.items() if key != "__metadata__")
        return sum(entry["data_offsets"][1] - entry["data_offsets"][0] for entry in tensors)
    except (OSError, ValueError, AttributeError, KeyError, TypeError, IndexError) as error:
        reason = getattr(error, "strerror", None) or " ".join(str(error).split())
        raise CheckpointError(f"shard file {path.name} cannot be read: {reason}; is it truncated or damaged?") from None


def _is_hub_id(model: str) -> bool:
    if model.count("/") != 1:
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@dataclass
class _HubRepo:
    """One hub repository pinned to the commit its config.json resolved to, so all files match."""

    repo_id: str
    revision: str  # what the user asked for until config.json resolves it to a commit hash
    snapshot: pathlib.Path
    cache_dir: str
    offline: bool

    @classmethod
    def open(cls, repo_id: str, revision: str | None) -> _HubRepo:
        # huggingface_hub reads these variables once, at import; read them per call so a changed env counts.
        cache_dir = os.environ.get("HF_HUB_CACHE") or (
            os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE
        )
        offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE") or constants.HF_HUB_OFFLINE
        repo = cls(repo_id, revision or "main", pathlib.Path(), os.path.expanduser(cache_dir), offline)
        repo.snapshot = repo.fetch("config.json").parent  # .../snapshots/<commit>/config.json
        repo.revision = repo.snapshot.name
        return repo

    def fetch(self, filename: str, optional: bool = False) -> pathlib.Path | None:
        """Download one file into the cache (or find it there when offline) and return its snapshot path;
        None for an optional file the repository (or, offline, the cache) lacks."""
        _safe_relative_name(filename)
        try:
            path = hf_hub_download(
                self.repo_id, filename, revision=self.revision, cache_dir=self.cache_dir, local_files_only=self.offline
            )
        except RepositoryNotFoundError:
            raise CheckpointError(f"{self.repo_id}: no such repository on the hub, or no access to it") from None
        except LocalEntryNotFoundError:  # not cached, and the hub was off limits or unreachable
            if optional:
                return None
            raise CheckpointError(
                f"{self.repo_id}: {filename} is not in the local Hugging Face cache {self.cache_dir}"
                " and downloads are off (HF_HUB_OFFLINE) or the hub is unreachable"
            ) from None
        except EntryNotFoundError:  # the hub answered: no such file in the repository
            if optional:
                return None
            raise CheckpointError(f"{self.repo_id}: the repository has no file {filename}") from None
        except HfHubHTTPError as error:
            raise CheckpointError(f"{self.repo_id}: cannot download {filename}: {str(error).splitlines()[0]}") from None
        return pathlib.Path(path)

    def list_files(self) -> list[str]:
        """Top-level files of the repo: the cached snapshot if it holds weights, else the hub's listing (the cached
        snapshot again where the hub cannot be reached, as downloads fall back to the cache)."""
        cached = sorted(p.name for p in self.snapshot.iterdir())
        if self.offline or any(name.endswith(".safetensors") for name in cached):
            return cached
        try:
            return [f for f in HfApi().list_repo_files(self.repo_id, revision=self.revision) if "/" not in f]
        except HfHubHTTPError as error:
            raise CheckpointError(f"{self.repo_id}: cannot list files: {str(error).splitlines()[0]}") from None
        except Exception:  # the hub unreachable: the HTTP client's own connection errors
            return cached
