"""Errors of the model layer that torch-free code (checkpoint resolution, the engine) must raise or catch.

They live apart from `models.loading` so that naming them does not import torch.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, or cannot be read safely: names the file and what is wrong."""


class UntrustedCheckpointError(CheckpointError):
    """A `.pth` file that holds pickled Python objects besides tensors.

    Unpickling such a file could run arbitrary code, so it is refused before anything in it runs.
    """
