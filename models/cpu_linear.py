"""CPU inference kernels shared by the DiT families (Wan, FLUX): prepacked GEMMs and fused elementwise steps.

The models keep their math in their own files; this module holds only the ways of computing it faster on CPU
that more than one family uses, each with the reason it is faster:
- `PackedLinear`: `nn.Linear` whose inference GEMM multiplies by a weight prepacked once into the oneDNN (bf16)
  or MKL (fp32) blocked layout, optionally with the tanh-GELU in the GEMM epilogue (the bias is in the
  epilogue too); `PackedWeights` gives a model the switches and the memory report for its packed copies.
- `norm_modulate`: adaLN's LN(x) * (1 + scale) + shift as the affine part of one LayerNorm pass.
- `residual_add`: the residual-stream update, in place when autograd is off (the caller owns the tensor).
With autograd recording, everything here falls back to the plain out-of-place ops, so training works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------
# 1. Fused elementwise steps
# ---------------------------------------------------------------------------------------------
def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift in fp32 (non-affine LayerNorm), cast to `dtype`.

    x: (B, L, d) fp32; shift/scale: (B, 1, d) fp32. The modulation is the affine part of one LayerNorm per
    sample: one pass instead of two (CPU's non-affine LayerNorm is even slower than the affine one), and
    bit-identical to LN then addcmul in our measurements.
    """
    if x.shape[0] == 1:
        return F.layer_norm(x, x.shape[-1:], 1 + scale[0, 0], shift[0, 0], eps).to(dtype)
    if torch.is_grad_enabled():  # training: one batched LayerNorm (same math, other rounding), no per-sample loop
        return (F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift).to(dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    for i in range(x.shape[0]):
        out[i] = F.layer_norm(x[i], x.shape[-1:], 1 + scale[i, 0], shift[i, 0], eps)
    return out


def residual_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """x + gate * y (or x + y), in x's dtype; y may be in a lower precision (it is upcast inside the op).

    Without autograd recording, `x` is updated in place and returned: the caller must own it (a tensor the
    block made, never its input, which a feature cache may hold). With autograd, the sum is made out of
    place, because ops before it (LayerNorm, ...) saved `x` for their backward; the values are bit-identical.
    """
    if torch.is_grad_enabled():
        return x + y if gate is None else torch.addcmul(x, y, gate)
    return x.add_(y) if gate is None else x.addcmul_(y, gate)


# ---------------------------------------------------------------------------------------------
# 2. Prepacked GEMMs
# ---------------------------------------------------------------------------------------------
def _op(namespace: str, name: str) -> object | None:
    """`torch.ops.<namespace>.<name>` if this build has it (a CUDA-only or non-x86 build may not)."""
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _op("mkldnn", "_linear_pointwise") if torch.backends.mkldnn.is_available() else None
_ONEDNN_PACK = _op("mkldnn", "_reorder_linear_weight") if _ONEDNN_LINEAR is not None else None
_ONEDNN_BF16_CHECK = _op("mkldnn", "_is_mkldnn_bf16_supported")
_ONEDNN_BF16 = _ONEDNN_PACK is not None and _ONEDNN_BF16_CHECK is not None and bool(_ONEDNN_BF16_CHECK())
_MKL_LINEAR = _op("mkl", "_mkl_linear") if torch.backends.mkl.is_available() else None
_MKL_PACK = _op("mkl", "_mkl_reorder_linear_weight") if _MKL_LINEAR is not None else None


@dataclass
class _Packed:
    """A packed weight and what it was packed from.

    `source` is a detached alias of the packed weight (same storage and version counter); holding it also
    keeps a replaced weight's address from being reused, so the data_ptr check cannot match a new tensor.
    """

    kind: str  # "onednn" or "mkl"
    weight: torch.Tensor
    source: torch.Tensor
    version: int
    rows: int


class PackedLinear(nn.Linear):
    """`nn.Linear` whose CPU inference path multiplies by a prepacked copy of its weight.

    oneDNN (bf16) and MKL (fp32) GEMMs work on the weight in a blocked layout; given a plain weight they
    re-block it on every call, which cost up to 30% of a GEMM at Wan2.1-1.3B's shapes with 2 threads (most for
    the 512-row text GEMMs and the FFN up-projection; ~12% of the whole bf16 forward). Here the blocked copy is
    made once, on first use, as Inductor's weight prepacking does:
      - bf16: oneDNN blocked weight (`mkldnn._reorder_linear_weight`); `gelu=True` also runs the tanh-GELU on
        the fp32 accumulator in the GEMM epilogue.
      - fp32: MKL packed GEMM (`mkl._mkl_linear`, 5-15% faster than `F.linear` here), whose packing is
        made for one row count and rebuilt when it changes; with `gelu=True`, the oneDNN blocked weight and
        the fused GELU (faster than an MKL GEMM followed by a separate GELU pass).
    The packed copy is a plain attribute, not a parameter or buffer: `state_dict`, `named_parameters`,
    checkpoints and the parameter names see only the ordinary weight. It is used only on CPU, with no
    autograd recording, outside `torch.compile` and for at least `min_rows` rows (a GEMV gains nothing);
    otherwise, or when the ops are missing from the build, the layer is plain `F.linear`.

    Invalidation: the pack is rebuilt when the weight's storage, version counter (any in-place write through
    the parameter, e.g. `load_state_dict`), dtype, device or shape changes; it is dropped by `release_packed`,
    `Module.to`/`cuda`/`half`/..., pickling and `deepcopy`. An in-place write through `weight.data` does not
    bump the version counter: call `release_packed` after one.

    Memory: the packed copy is a second copy of the weight, kept next to the plain one (which `state_dict`
    returns and the fallback paths use, and which MKL's packed GEMM itself needs): +100% of the weight in
    bf16, +125-185% in fp32 (MKL's packed format is padded; 27x for Wan's 64-wide head, 10 MB). For the
    Wan2.1-1.3B DiT in bf16 that is +2.6 GB of CPU memory, for a 14B expert +28 GB, for FLUX.1 (12B) about
    +22 GB (the modulation linears, one row per sample, are never packed); `PackedWeights.packed_weight_bytes`
    reports it. Set `prepack = False` (`set_weight_prepacking(False)` on the model) to trade the speed for the
    memory. Replacing the plain weight by the packed one is not done: parameters, `state_dict`, `.to()` and
    the autograd path need it.
    """

    min_rows = 32
    prepack = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._packed: _Packed | None = None
        self._parts: dict[tuple, _Packed] = {}  # (rows, cols) block -> its oneDNN pack (see `part`)

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """`layer(x)`, or gelu_tanh(layer(x)) with `gelu`, in the weight dtype (x is cast to it first)."""
        x = x.to(self.weight.dtype)
        packed = self._packed_for(x, gelu)
        if packed is None:
            y = F.linear(x, self.weight, self.bias)
            return F.gelu(y, approximate="tanh") if gelu else y
        if packed.kind == "mkl":
            return _MKL_LINEAR(x, packed.weight, self.weight, self.bias, packed.rows)
        return _ONEDNN_LINEAR(x, packed.weight, self.bias, "gelu" if gelu else "none", [], "tanh" if gelu else "")

    def part(self, x: torch.Tensor, rows: slice = slice(None), cols: slice = slice(None), *, gelu: bool = False,
             bias: bool = True, accumulate: torch.Tensor | None = None) -> torch.Tensor:
        """One block of this layer's GEMM: x @ W[rows, cols]^T (+ b[rows]), then the tanh-GELU or + `accumulate`.

        Lets a model run one stored layer as several GEMMs without concatenating or splitting activations:
        FLUX's single-stream block runs linear1's q/k/v rows and its MLP rows (with the GELU in the epilogue)
        apart, and linear2 over the attention and the MLP column blocks, the second GEMM adding the first's
        result in its epilogue. Each block is packed once for oneDNN (bf16 and fp32), under the same rules as
        the whole weight (see the class docstring); the whole weight is then never packed.
        """
        if gelu and accumulate is not None:
            raise ValueError("part() applies either the GELU or the accumulation, not both")
        x = x.to(self.weight.dtype)
        b = self.bias[rows] if (bias and self.bias is not None) else None
        packed = self._packed_for(x, gelu, block=(rows, cols))
        if packed is None:
            y = F.linear(x, self.weight[rows, cols], b)
            y = F.gelu(y, approximate="tanh") if gelu else y
            return y if accumulate is None else y + accumulate
        if accumulate is not None:
            return _ONEDNN_LINEAR.binary(x, accumulate.to(x.dtype), packed.weight, b, "add")
        return _ONEDNN_LINEAR(x, packed.weight, b, "gelu" if gelu else "none", [], "tanh" if gelu else "")

    def _packed_for(self, x: torch.Tensor, gelu: bool, block: tuple[slice, slice] | None = None) -> _Packed | None:
        """The packed weight (or weight block) for this call, made or rebuilt if needed; None for the plain path."""
        w, dtype = self.weight, self.weight.dtype
        rows = x.numel() // max(x.shape[-1], 1)
        if not (self.prepack and x.device.type == "cpu" and rows >= self.min_rows):
            return None
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                        or (self.bias is not None and self.bias.requires_grad)):
            return None  # the packed ops have no backward
        if torch.compiler.is_compiling():
            return None  # Inductor packs weights itself
        if block is not None:
            return self._packed_block(block, rows) if _ONEDNN_PACK is not None and (
                dtype == torch.float32 or (dtype == torch.bfloat16 and _ONEDNN_BF16)) else None
        if dtype == torch.bfloat16 and _ONEDNN_BF16:
            kind = "onednn"
        elif dtype == torch.float32 and gelu and _ONEDNN_PACK is not None:
            kind = "onednn"
        elif dtype == torch.float32 and not gelu and _MKL_PACK is not None:
            kind = "mkl"
        else:
            return None
        p = self._packed
        if self._current(p, kind) and (kind == "onednn" or p.rows == rows):
            return p
        self._packed = None  # free the stale copy before making the new one
        with torch.inference_mode(False), torch.no_grad():
            source = w.detach()
            packed = _MKL_PACK(source, rows) if kind == "mkl" else _ONEDNN_PACK(source, rows)
        self._packed = _Packed(kind, packed, source, w._version, rows)
        return self._packed

    def _packed_block(self, block: tuple[slice, slice], rows: int) -> _Packed:
        """The oneDNN pack of the weight block W[block] (see `part`)."""
        key = tuple((s.start, s.stop, s.step) for s in block)
        p = self._parts.get(key)
        if self._current(p, "onednn"):
            return p
        self._parts.pop(key, None)
        with torch.inference_mode(False), torch.no_grad():
            source = self.weight.detach()
            packed = _ONEDNN_PACK(source[block].contiguous(), rows)
        self._parts[key] = _Packed("onednn", packed, source, source._version, rows)
        return self._parts[key]

    def _current(self, p: _Packed | None, kind: str) -> bool:
        """Whether pack `p` was made, as `kind`, from the weight as it is now."""
        w = self.weight
        return (p is not None and p.kind == kind and p.source.data_ptr() == w.data_ptr() and p.source.dtype == w.dtype
                and p.source.device == w.device and p.source.shape == w.shape and p.version == w._version)

    def release_packed(self) -> None:
        """Drop the packed copies (they are rebuilt on the next CPU inference call if `prepack` is set)."""
        self._packed = None
        self._parts = {}

    @property
    def packed_bytes(self) -> int:
        """Bytes held by the packed copies (0 when there are none)."""
        packs = [p for p in (self._packed, *self._parts.values()) if p is not None]
        return sum(p.weight.numel() * p.weight.element_size() for p in packs)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        self.release_packed()  # .to() / .cuda() / .half() ...: the packs belong to the old tensors
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_packed"], state["_parts"] = None, {}  # opaque oneDNN/MKL tensors can't be pickled or deep-copied
        return state


class PackedWeights:
    """Mixin for a model built from `PackedLinear` layers: switch the packing, free it, report its memory, and cast
    its weights under the model's precision policy (the model's `keep_fp32(name)` names what stays fp32)."""

    def cast_weights(self, dtype: torch.dtype):  # noqa: ANN201 - returns the model itself
        """Cast the matmul weights to `dtype`, keeping the `keep_fp32` parameters in fp32 (unlike `.to`)."""
        self.release_packed_weights()
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.data = p.data.to(torch.float32 if self.keep_fp32(name) else dtype)
        return self

    def set_weight_prepacking(self, enabled: bool):  # noqa: ANN201 - returns the model itself
        """Turn the CPU prepacked-weight GEMMs on (the default) or off; off also frees the packed copies."""
        for layer in self.modules():
            if isinstance(layer, PackedLinear):
                layer.prepack = enabled
                layer.release_packed()
        return self

    def release_packed_weights(self) -> None:
        """Free every packed weight copy (they are rebuilt on the next CPU forward while prepacking is on)."""
        for layer in self.modules():
            if isinstance(layer, PackedLinear):
                layer.release_packed()

    def packed_weight_bytes(self) -> int:
        """CPU memory held by the packed weight copies, on top of the parameters."""
        return sum(layer.packed_bytes for layer in self.modules() if isinstance(layer, PackedLinear))
