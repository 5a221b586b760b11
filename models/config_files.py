"""Reading a checkpoint's JSON files, torch-free (the engine and the HTTP ingress describe checkpoints too).

Every family reads diffusers component folders the same way: config.json must exist, parse, and name the
expected class; the family's parser turns it into its config, and any error names the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, TypeVar

from models.errors import CheckpointError


def read_json(path: str | Path) -> dict:
    """A checkpoint's JSON file (CheckpointError when it is missing or not JSON)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


ConfigT = TypeVar("ConfigT")


def read_diffusers_config(folder: str | Path, class_name: str, parse: Callable[[dict], ConfigT]) -> ConfigT:
    """The model config in a diffusers component folder's config.json, which must be for `class_name`; `parse`
    turns the JSON into the family's config (its errors become CheckpointError naming the file)."""
    path = Path(folder) / "config.json"
    cfg = read_json(path)
    if cfg.get("_class_name") != class_name:
        raise CheckpointError(f"{path}: _class_name {cfg.get('_class_name')!r} is not {class_name}")
    try:
        return parse(cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


DIFFUSERS_TRANSFORMER_DIR = "transformer"


def diffusers_transformer_folder(path: str | Path, family: str) -> Path:
    """The DiT folder of a diffusers release (its `transformer/`) or that folder itself."""
    path = Path(path).expanduser()
    for folder in (path / DIFFUSERS_TRANSFORMER_DIR, path):
        if (folder / "config.json").is_file():
            return folder
    raise CheckpointError(f"{path} is not a {family} checkpoint: expected {DIFFUSERS_TRANSFORMER_DIR}/config.json "
                          f"(a diffusers release) or config.json (its transformer folder)")
