"""Untrusted `.pth` checkpoints: a file that pickles anything but tensors is refused, and nothing in it runs.

The payloads are real: each writes a marker file when unpickled by a plain `pickle`/`torch.load`
(`test_payloads_do_run_when_unpickled_unsafely` proves it), so a missing marker after a refused load
means the code did not run. Every loader that reads a `.pth` is covered: `load_torch_file` itself,
the Wan VAE and the umT5 encoder from their files and from an original-layout checkpoint folder,
and the decode and text-encode actors of the service.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from actors.stage_actors import TextEncoderActor, VAEDecoderActor
from models.errors import CheckpointError, UntrustedCheckpointError
from models.loading import load_torch_file
from models.wan.checkpoint import ORIGINAL_T5_FILE, ORIGINAL_TOKENIZER_DIR, ORIGINAL_VAE_FILE, WanCheckpoint
from models.wan.default_model import DEFAULT_MODEL_DIR
from models.wan.text_encoder import WanTextEncoder
from models.wan.vae import WanVAE


class _ShellPayload:
    """Runs a shell command when unpickled: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return os.system, (f"touch '{self.marker}'",)


class _ExecPayload:
    """Runs Python code when unpickled, without a shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _torch_save_payload(path: Path, marker: Path) -> None:
    """torch's zip format: real weights plus one pickled object next to them."""
    torch.save({"weight": torch.zeros(2, 2), "payload": _ShellPayload(marker)}, path)


def _legacy_payload(path: Path, marker: Path) -> None:
    """torch's pre-zip format (torch < 1.6, a sequence of plain pickles), which cannot be memory-mapped."""
    torch.save({"weight": torch.zeros(2, 2), "payload": _ExecPayload(marker)}, path,
               _use_new_zipfile_serialization=False)


WRITERS = {"zip": _torch_save_payload, "legacy": _legacy_payload}


def _assert_refused(exc: pytest.ExceptionInfo[CheckpointError], path: Path, marker: Path) -> None:
    message = str(exc.value)
    assert isinstance(exc.value, UntrustedCheckpointError), message
    assert str(path) in message, message
    assert "weights-only" in message and "Only weights are accepted" in message, message
    assert "safetensors" in message, message
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("writer", WRITERS, ids=list(WRITERS))
def test_payloads_do_run_when_unpickled_unsafely(tmp_path: Path, writer: str) -> None:
    """The control: the same files, unpickled without restrictions, run their payload."""
    path, marker = tmp_path / "x.pth", tmp_path / "ran"
    WRITERS[writer](path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("writer", WRITERS, ids=list(WRITERS))
def test_load_torch_file_refuses_pickled_objects(tmp_path: Path, writer: str) -> None:
    path, marker = tmp_path / "weights.pth", tmp_path / "ran"
    WRITERS[writer](path, marker)
    with pytest.raises(CheckpointError) as exc:
        load_torch_file(path)
    _assert_refused(exc, path, marker)


def test_vae_and_text_encoder_files_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    vae, t5 = tmp_path / ORIGINAL_VAE_FILE, tmp_path / ORIGINAL_T5_FILE
    _torch_save_payload(vae, marker)
    _legacy_payload(t5, marker)
    with pytest.raises(CheckpointError) as exc:
        WanVAE.from_pretrained(vae)
    _assert_refused(exc, vae, marker)
    with pytest.raises(CheckpointError) as exc:
        WanTextEncoder.from_files(t5, DEFAULT_MODEL_DIR / ORIGINAL_TOKENIZER_DIR)
    _assert_refused(exc, t5, marker)


def _checkpoint_with(tmp_path: Path, poisoned: str, marker: Path) -> Path:
    """The shipped default model in the original layout, with one `.pth` replaced by a malicious one."""
    root = tmp_path / "ckpt"
    shutil.copytree(DEFAULT_MODEL_DIR, root)
    _torch_save_payload(root / poisoned, marker)
    return root


def test_original_layout_folder_with_a_malicious_vae_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    root = _checkpoint_with(tmp_path, ORIGINAL_VAE_FILE, marker)
    checkpoint = WanCheckpoint.resolve(root)  # resolving reads JSON and file names only
    with pytest.raises(CheckpointError) as exc:
        WanVAE.from_pretrained(checkpoint.root)  # the folder form
    _assert_refused(exc, root.resolve() / ORIGINAL_VAE_FILE, marker)
    with pytest.raises(CheckpointError) as exc:
        VAEDecoderActor(str(root), "cpu")  # the service's decode actor
    _assert_refused(exc, root.resolve() / ORIGINAL_VAE_FILE, marker)


def test_original_layout_folder_with_a_malicious_text_encoder_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    root = _checkpoint_with(tmp_path, ORIGINAL_T5_FILE, marker)
    with pytest.raises(CheckpointError) as exc:
        WanTextEncoder.from_pretrained(root)
    _assert_refused(exc, root / ORIGINAL_T5_FILE, marker)
    with pytest.raises(CheckpointError) as exc:
        TextEncoderActor(str(root), "fp32", "cpu")  # the service's text-encode actor
    _assert_refused(exc, root.resolve() / ORIGINAL_T5_FILE, marker)


def test_the_suggested_safetensors_conversion_loads(tmp_path: Path) -> None:
    """What the error message suggests works: the VAE's tensors saved as safetensors load the same model."""
    original = WanVAE.from_pretrained(DEFAULT_MODEL_DIR / ORIGINAL_VAE_FILE)
    converted = tmp_path / "Wan2.1_VAE.safetensors"
    save_file(load_torch_file(DEFAULT_MODEL_DIR / ORIGINAL_VAE_FILE), str(converted))
    loaded = WanVAE.from_pretrained(converted)
    assert loaded.config == original.config
    expected = original.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in loaded.state_dict().items())
