"""The model families, and which one a checkpoint folder belongs to.

Adding a family is adding its folder under `models/` with a `family.py` (see models/wan/family.py)
and one line in `FAMILIES`. Family modules are imported only when asked about, and a family's
`recognises` / `describe` read JSON and file names only, so resolving a checkpoint stays torch-free.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from models.errors import CheckpointError
from models.cache_calibration import calibrated
from models.family import ModelDescription

FAMILIES: dict[str, str] = {
    "wan": "models.wan.family",
    "flux": "models.flux.family",
    "qwen-image": "models.qwen_image.family",
    "z-image": "models.z_image.family",
    "flux2": "models.flux2.family",
}
"""family name -> the module that recognises and describes its checkpoints."""


def family_module(name: str) -> ModuleType:
    """The module of family `name` (imported on first use)."""
    try:
        return importlib.import_module(FAMILIES[name])
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; the families are {', '.join(FAMILIES)}") from None


def resolve_model_path(path_or_name: str | Path | None) -> Path:
    """The checkpoint folder of a path, or of a bundled model's name (None: the embedded default model).

    The bundled models are Wan's (the embedded `wan-tiny-shapes`, and `wan-tiny` with random weights);
    layers above models/ ask here, so no stage, actor or service module names a family.
    """
    from models.wan.default_model import resolve_model_path as resolve_bundled

    return resolve_bundled(path_or_name)


def describe(path: str | Path, calibration: str | Path | None = None) -> ModelDescription:
    """The description of the checkpoint in folder `path`, from the first family that recognises it, with its
    feature-cache calibration: the file `calibration` names, else the one in the folder, if any."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {root}")
    for name in FAMILIES:
        module = family_module(name)
        if module.recognises(root):
            return calibrated(module.describe(root), calibration)
    raise CheckpointError(f"{root} is not a checkpoint of a known family ({', '.join(FAMILIES)}); see the README, "
                          f"'Models', for the layouts each family loads")
