"""`models.qwen_image` and its registry entry import no torch; the networks load on first use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_package_and_its_family_entry_are_torch_free() -> None:
    code = ("import sys; import models.qwen_image as q, models.qwen_image.family as f, models.qwen_image.text_config; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'; "
            "print(sorted(q.PRESETS), f.description(q.get_preset('qwen-image')).num_blocks)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["['qwen-image',", "'qwen-image-tiny']", "60"]


def test_networks_are_exported_lazily() -> None:
    import models.qwen_image as package
    from models.qwen_image.config import QWEN_IMAGE_TINY, match_preset
    from models.qwen_image.text_encoder import QwenImageTextEncoder
    from models.qwen_image.transformer import QwenImageTransformer
    from models.qwen_image.vae import QwenImageVAE

    assert (package.QwenImageTransformer, package.QwenImageTextEncoder, package.QwenImageVAE) == (
        QwenImageTransformer, QwenImageTextEncoder, QwenImageVAE)
    assert match_preset(QWEN_IMAGE_TINY).name == "qwen-image-tiny"
    assert match_preset(QWEN_IMAGE_TINY.__class__(num_layers=3)).name == "custom"
