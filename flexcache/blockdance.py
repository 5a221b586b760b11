"""BlockDance, in the schedule form of ChituDiffusion's port, on any family's block list.

Late in denoising the shallow and middle ("structure") blocks give nearly the same hidden states from one
step to the next. Inside the active window [start, end) of the T steps, with
start = max(warmup, round(start_fraction * T)) and end = min(T - cooldown, round(end_fraction * T)) (both
clamped to [0, T], end >= start, Python's round as in the port), the steps form groups of `group_size`
counted from `start`: the first step of a group ((step - start) mod group_size == 0) computes every block
and stores the hidden states after block `boundary_block` (the image tokens, and a joint model's text
tokens); the other steps of the group skip blocks 0 .. boundary_block and start block `boundary_block + 1`
from the stored states. Outside the window every block is computed. Without stored states of the right
shape (after a reset, e.g. Wan2.2's expert switch) a reuse step computes everything without storing, as in
the port.

`boundary_block` is the last reused block (0-based), as in ChituDiffusion's port: its benchmarked b18 on
Wan2.1-1.3B's 30 blocks reuses 19 of them. At least one block must stay computed.

The decision depends on the step only, so it is the same on every rank; under context parallelism each rank
stores its own shard of the image tokens (the text tokens are whole on every rank), which is what that rank
resumes from. Under CFG the stored states hold every branch's rows. A group size of 1 computes everything,
bit for bit.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from flexcache.hooks import StepInfo, Streams
from flexcache.strategy import CacheStrategy, tensor_bytes


class BlockDance(CacheStrategy):
    """BlockDance over `num_steps` steps: groups of `group_size` steps reuse blocks 0..boundary_block."""

    def __init__(self, boundary_block: int, group_size: int, start_fraction: float, end_fraction: float,
                 warmup: int, cooldown: int, num_steps: int) -> None:
        super().__init__()
        if boundary_block < 0 or group_size < 1:
            raise ValueError(f"BlockDance needs boundary_block >= 0 and group_size >= 1, got {boundary_block}, "
                             f"{group_size}")
        self.boundary_block, self.group_size, self.num_steps = boundary_block, group_size, num_steps
        start = max(warmup, round(num_steps * start_fraction))
        end = min(num_steps - cooldown, round(num_steps * end_fraction))
        self.start = max(0, min(num_steps, start))
        self.end = max(self.start, min(num_steps, end))
        self.decisions: dict[int, dict[str, bool]] = {}  # step -> {"reused": ...} (tests and traces)
        self.reset()

    def reset(self) -> None:
        self._stored: Streams | None = None
        self._skipping = False

    def extra_bytes(self) -> int:
        return tensor_bytes(*(self._stored or ()))

    def group_offset(self, step: int) -> int | None:
        """The step's place in its group; None outside the active window."""
        if not self.start <= step < self.end:
            return None
        return (step - self.start) % self.group_size

    def stores(self, step: int) -> bool:
        """Whether the schedule stores the boundary states at `step` (a group's first step, when groups reuse)."""
        return self.group_size > 1 and self.group_offset(step) == 0

    def reuses(self, step: int) -> bool:
        """Whether the schedule reuses the stored states at `step` (given states of the right shape)."""
        return self.group_offset(step) not in (None, 0)

    def block(self, info: StepInfo, index: int, block: nn.Module, compute: Callable[..., Streams],
              img: torch.Tensor, txt: torch.Tensor | None) -> Streams:
        boundary = self.boundary_block + 1  # the blocks a reuse step skips
        if index == 0:
            if boundary >= info.num_blocks:
                raise ValueError(f"BlockDance's boundary_block ({self.boundary_block}) must leave a block to compute: "
                                 f"at most {info.num_blocks - 2} for the model's {info.num_blocks} blocks")
            self._skipping = self.reuses(info.step) and self._fits(img, txt)
            self.decisions[info.step] = {"reused": self._skipping}
            if self._skipping:
                self.stats.forwards_reused += 1
            else:
                self.stats.forwards_computed += 1
        if index < boundary and self._skipping:
            self.stats.blocks_reused += 1
            return self._stored if index == boundary - 1 else (img, txt)  # type: ignore[return-value]
        out = compute(img, txt)
        self.stats.blocks_computed += 1
        if index == boundary - 1 and self.stores(info.step):
            self._stored = out
            self._account_memory()
        return out

    def _fits(self, img: torch.Tensor, txt: torch.Tensor | None) -> bool:
        """Whether stored states exist for streams shaped like the stack's input."""
        if self._stored is None:
            return False
        stored_img, stored_txt = self._stored
        return stored_img.shape == img.shape and (
            (stored_txt is None and txt is None)
            or (stored_txt is not None and txt is not None and stored_txt.shape == txt.shape))
