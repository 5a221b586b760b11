"""Key maps between the two FLUX.2 autoencoder layouts: pure functions on state dicts.

Native names (models.flux2.vae) are those of BFL's original file. Everything the FLUX.1 autoencoder has is
renamed by FLUX.1's rules (models.flux.vae_keys: levels, mid blocks, attention 1x1 kernels vs Linear). The
three FLUX.2 additions sit at these names:

    encoder.quant_conv.*        <-> quant_conv.*
    decoder.post_quant_conv.*   <-> post_quant_conv.*
    bn.running_mean / running_var / num_batches_tracked   (the same in both)

BFL's file may lack `bn.num_batches_tracked` (diffusers' converter copies only the running mean and
variance); the counter is never read, so `with_batch_counter` adds a zero one, as torch's BatchNorm does when
it loads such a state dict.
"""

from __future__ import annotations

import torch

from models.flux import vae_keys as flux1_keys
from models.flux2.vae_config import Flux2VAEConfig

__all__ = ["BN_COUNTER", "diffusers_to_original", "original_to_diffusers", "strip_original_prefix",
           "with_batch_counter"]

StateDict = dict[str, torch.Tensor]

# diffusers name -> original name of the parts FLUX.1's autoencoder does not have.
_EXTRA_DIFFUSERS_TO_ORIGINAL = {"quant_conv.": "encoder.quant_conv.", "post_quant_conv.": "decoder.post_quant_conv."}
_BN_PREFIX = "bn."
BN_COUNTER = "bn.num_batches_tracked"

strip_original_prefix = flux1_keys.strip_original_prefix


def with_batch_counter(sd: StateDict) -> StateDict:
    """`sd` with a zero `bn.num_batches_tracked` when it has BatchNorm statistics but no counter."""
    if BN_COUNTER in sd or "bn.running_mean" not in sd:
        return sd
    return {**sd, BN_COUNTER: torch.tensor(0, dtype=torch.long)}


def diffusers_to_original(sd: StateDict, config: Flux2VAEConfig) -> StateDict:
    """A diffusers AutoencoderKLFlux2 state dict -> original (native) names."""
    out: StateDict = {}
    rest: StateDict = {}
    for key, value in sd.items():
        extra = next((p for p in _EXTRA_DIFFUSERS_TO_ORIGINAL if key.startswith(p)), None)
        if extra is not None:
            out[_EXTRA_DIFFUSERS_TO_ORIGINAL[extra] + key[len(extra):]] = value
        elif key.startswith(_BN_PREFIX):
            out[key] = value
        else:
            rest[key] = value
    out.update(flux1_keys.diffusers_to_original(rest, config.autoencoder))
    return out


def original_to_diffusers(sd: StateDict, config: Flux2VAEConfig) -> StateDict:
    """An original FLUX.2 autoencoder state dict -> diffusers AutoencoderKLFlux2 names (a counter is added)."""
    originals = {v: k for k, v in _EXTRA_DIFFUSERS_TO_ORIGINAL.items()}
    out: StateDict = {}
    rest: StateDict = {}
    for key, value in with_batch_counter(strip_original_prefix(sd)).items():
        extra = next((p for p in originals if key.startswith(p)), None)
        if extra is not None:
            out[originals[extra] + key[len(extra):]] = value
        elif key.startswith(_BN_PREFIX):
            out[key] = value
        else:
            rest[key] = value
    out.update(flux1_keys.original_to_diffusers(rest, config.autoencoder))
    return out
