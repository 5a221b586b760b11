"""Checkpoint I/O shared by all model families: safe file readers and one strict loader.

Weights are never unpickled as arbitrary objects: a `.pth` goes through `torch.load(weights_only=True)`,
whose restricted unpickler accepts tensors, containers and plain numbers only, so a file that holds any
other pickled object is refused (`UntrustedCheckpointError`) before that object is built. Weights are
never materialised twice either: modules are built on the meta device and the loaded tensors are
assigned in place (`load_state_dict(assign=True)`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, TypeVar

import torch
from safetensors.torch import load_file
from torch import nn

from models.errors import CheckpointError, UntrustedCheckpointError

__all__ = ["CheckpointError", "UntrustedCheckpointError", "check_keys", "load_safetensors_dir",
           "load_safetensors_file", "load_strict", "load_torch_file", "load_weights_file",
           "meta_device", "save_safetensors_sharded"]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)
StateDict = dict[str, torch.Tensor]

_MAX_LISTED = 10


def _refused_object(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused, e.g. "posix.system", from its page-long message."""
    text = str(exc)
    named = re.search(r"GLOBAL\s+([\w.]+)", text)
    if named:
        return named.group(1)
    lines = [line.strip().rstrip(".") for line in text.splitlines() if "nsupported" in line]
    return lines[0] if lines else "an object it does not allow"


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return shown + more


def load_torch_file(path: str | Path) -> StateDict:
    """A `.pth` state dict, loaded with `weights_only=True` (no arbitrary unpickling).

    Raises `UntrustedCheckpointError` when the file pickles anything but tensors (nothing in it runs),
    `CheckpointError` when it is missing, unreadable or not a flat dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        # mmap needs torch's zip format; files from torch < 1.6 (one plain pickle) are read whole.
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler stops at the first global it does not allow, before calling it.
        raise UntrustedCheckpointError(
            f"refused to load {path}: it is not a weights-only checkpoint; it pickles Python objects besides "
            f"tensors (the first one refused: {_refused_object(exc)}), and unpickling those could run arbitrary "
            f"code, so nothing in the file was run. Only weights are accepted: a dict of tensors saved "
            f"with torch.save. If you trust the file, convert it to safetensors (safetensors.torch.save_file on "
            f"its tensors, in a sandbox) and load the .safetensors file instead, or use the checkpoint's "
            f"*-Diffusers release, which holds safetensors only."
        ) from None
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {exc}") from exc
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return dict(sd)


def load_weights_file(path: str | Path) -> StateDict:
    """A state dict from one file: `.safetensors` as such, anything else as a weights-only `.pth`."""
    path = Path(path)
    return load_safetensors_file(path) if path.suffix == ".safetensors" else load_torch_file(path)


def load_safetensors_file(path: str | Path) -> StateDict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc


def load_safetensors_dir(folder: str | Path, stem: str = "diffusion_pytorch_model") -> tuple[StateDict, str]:
    """All tensors of `<stem>.safetensors` or of the shards listed in `<stem>.safetensors.index.json`.

    Returns the state dict and a description of the file(s) for error messages.
    """
    folder = Path(folder)
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        sd: StateDict = {}
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            part = load_safetensors_file(folder / shard)
            stray = sorted(k for k in part if weight_map.get(k) != shard)
            if stray:
                raise CheckpointError(f"{folder / shard} holds keys its index does not assign to it: {_listing(stray)}")
            sd.update(part)
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise CheckpointError(f"{index} lists keys found in no shard: {_listing(missing)}")
        return sd, f"{index} ({len(shards)} shards)"
    if single.is_file():
        return load_safetensors_file(single), str(single)
    found = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    if len(found) == 1:
        return load_safetensors_file(folder / found[0]), str(folder / found[0])
    raise CheckpointError(f"no {stem}.safetensors (or its .index.json) in {folder}; found {found or 'nothing'}")


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Build modules without allocating their weights."""
    with torch.device("meta"):
        yield


def check_keys(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], source: str,
               target: str) -> None:
    """Raise a `CheckpointError` listing every missing key, unexpected key and shape mismatch together."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    problems = [f"{what}: {_listing(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if keys]
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit {target}: " + "; ".join(problems))


def load_strict(
    module: M,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    dtype: torch.dtype | None = None,
    keep_fp32: Callable[[str], bool] = lambda name: False,
    device: torch.device | str = "cpu",
) -> M:
    """Load `state_dict` into `module` (usually built on meta) or raise a `CheckpointError`.

    Every missing key, unexpected key and shape mismatch is reported together, with `source`
    (the file) named. Tensors are cast to `dtype`, except names for which `keep_fp32` is true.
    Modules that own non-persistent buffers (e.g. RoPE tables) rebuild them in `init_buffers(device)`,
    which is called on every submodule that defines it.
    """
    expected = module.state_dict(keep_vars=True)
    check_keys(expected, state_dict, source, type(module).__name__)

    converted: StateDict = {}
    for name, tensor in state_dict.items():
        target = torch.float32 if (dtype is not None and keep_fp32(name)) else (dtype or expected[name].dtype)
        if not tensor.is_floating_point():
            target = tensor.dtype
        converted[name] = tensor.to(device=device, dtype=target)
    module.load_state_dict(converted, strict=True, assign=True)
    for sub in module.modules():
        init = getattr(sub, "init_buffers", None)
        if callable(init):
            init(torch.device(device))
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"after loading {source}, tensors are still unallocated: {_listing(leftover)}")
    return module.eval().requires_grad_(False)


def save_diffusers_folder(module: nn.Module, config_json: dict, folder: str | Path,
                          max_shard_bytes: int | None = None) -> Path:
    """Write a diffusers component folder: config.json + `diffusion_pytorch_model*.safetensors`."""
    folder = Path(folder)
    save_safetensors_sharded({k: v.detach() for k, v in module.state_dict().items()}, folder,
                             max_shard_bytes=max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    return folder


def save_safetensors_sharded(state_dict: Mapping[str, torch.Tensor], folder: str | Path,
                             stem: str = "diffusion_pytorch_model", max_shard_bytes: int | None = None) -> None:
    """Write `<stem>.safetensors`, or numbered shards plus an index when `max_shard_bytes` is exceeded."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(folder / f"{stem}.safetensors"))
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
