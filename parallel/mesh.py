"""The parallel layout of one DiT group: cfg_degree x ring_degree x ulysses_degree ranks.

Rank order puts Ulysses innermost and CFG outermost (docs/design.md, "Context parallelism"): the Ulysses
all-to-alls, the heaviest traffic, stay between neighbouring ranks (one NVLink island), the ring
crosses Ulysses groups, and the two CFG halves are [0, world/2) and [world/2, world):

    rank = (cfg_index * ring_degree + ring_index) * ulysses_degree + ulysses_index

`ParallelLayout` is plain data with the start-up checks and the automatic choice; `ParallelMesh`
creates the torch.distributed sub-groups of a layout over an existing process group. torch is
imported only by `ParallelMesh.build`, so the engine can validate a layout before any rank starts
without loading torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch.distributed as dist

logger = logging.getLogger(__name__)

MAX_AUTO_ULYSSES = 8
"""The automatic layout keeps Ulysses within 8 ranks, the usual NVLink island of one node."""


class LayoutError(ValueError):
    """A parallel layout that cannot run this model on this group; the message says what to change."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelLayout:
    """How one request is spread over the ranks of a DiT group."""

    cfg_degree: int = 1
    ring_degree: int = 1
    ulysses_degree: int = 1

    @property
    def world_size(self) -> int:
        return self.cfg_degree * self.ring_degree * self.ulysses_degree

    @property
    def sp_degree(self) -> int:
        """Ranks that share one sequence (ring x ulysses)."""
        return self.ring_degree * self.ulysses_degree

    def __str__(self) -> str:
        parts = [f"{name}{deg}" for name, deg in (("cfg", self.cfg_degree), ("ring", self.ring_degree),
                                                  ("ulysses", self.ulysses_degree)) if deg > 1]
        return "x".join(parts) or "single"

    def validate(self, world_size: int, num_heads: int, guided: bool,
                 world_label: str = "dit.world_size", guidance: str = "cfg") -> "ParallelLayout":
        """Raise LayoutError naming the problem and a valid alternative; returns self when it can run.

        world_size: ranks that run one request; num_heads: the model's attention heads; guided: whether
        guidance runs an unconditional branch (guidance_scale != 1); world_label: the setting that fixed
        world_size, named in the message; guidance: the model's guidance kind ("cfg", "distilled", "none").
        """
        for name, degree in (("cfg_degree", self.cfg_degree), ("ring_degree", self.ring_degree),
                             ("ulysses_degree", self.ulysses_degree)):
            if degree < 1:
                raise LayoutError(f"{name} must be at least 1, got {degree}")
        if self.cfg_degree not in (1, 2):
            raise LayoutError(f"cfg_degree must be 1 or 2 (one rank group per guidance branch), got {self.cfg_degree}")
        hint = _hint(world_size, num_heads, guided)
        if self.world_size != world_size:
            raise LayoutError(
                f"parallel layout cfg_degree {self.cfg_degree} x ring_degree {self.ring_degree} x ulysses_degree "
                f"{self.ulysses_degree} = {self.world_size} ranks, but there are {world_size} "
                f"({world_label}); the degrees must multiply to {world_size}{hint}")
        if num_heads % self.ulysses_degree:
            valid = ", ".join(str(d) for d in divisors(num_heads))
            raise LayoutError(
                f"ulysses_degree {self.ulysses_degree} does not divide the model's {num_heads} attention heads "
                f"(valid Ulysses degrees: {valid}); use ring_degree for the rest{hint}")
        if self.cfg_degree == 2 and guidance != "cfg":
            how = ("is distilled into the model (the scale is an input of its one forward per step)"
                   if guidance == "distilled" else "is none (one forward per step)")
            raise LayoutError(
                f"cfg_degree 2 needs classifier-free guidance, but this model's guidance {how}: there is no "
                f"second branch to run on the other half of the ranks; use cfg_degree 1{hint}")
        if self.cfg_degree == 2 and not guided:
            raise LayoutError(
                f"cfg_degree 2 needs classifier-free guidance, but guidance_scale is 1 (no unconditional "
                f"branch to run on the second half of the ranks); use cfg_degree 1{hint}")
        return self


def _hint(world_size: int, num_heads: int, guided: bool) -> str:
    try:
        return f", e.g. {describe(auto_layout(world_size, num_heads, guided))}"
    except LayoutError:
        return ""


def describe(layout: ParallelLayout) -> str:
    return (f"cfg_degree={layout.cfg_degree} ring_degree={layout.ring_degree} "
            f"ulysses_degree={layout.ulysses_degree}")


def auto_layout(world_size: int, num_heads: int, guided: bool, max_ulysses: int = MAX_AUTO_ULYSSES) -> ParallelLayout:
    """The order published scaling results favour (docs/design.md): CFG parallel first (near-ideal, least
    traffic), then the largest Ulysses degree that divides both the rest and the head count (at most
    `max_ulysses`, one NVLink island), and Ring for whatever remains.
    """
    if world_size < 1:
        raise LayoutError(f"world_size must be at least 1, got {world_size}")
    cfg = 2 if guided and world_size % 2 == 0 else 1
    sp = world_size // cfg
    ulysses = max(d for d in divisors(sp) if num_heads % d == 0 and d <= max_ulysses)
    return ParallelLayout(cfg_degree=cfg, ring_degree=sp // ulysses, ulysses_degree=ulysses)


def resolve_layout(world_size: int, num_heads: int, guided: bool, cfg_degree: int | None = None,
                   ring_degree: int | None = None, ulysses_degree: int | None = None,
                   world_label: str = "dit.world_size", guidance: str = "cfg") -> ParallelLayout:
    """The layout for the configured degrees, validated: all three None = `auto_layout`, otherwise an
    unset degree is 1. Raises LayoutError with the reason and a valid alternative.
    """
    if cfg_degree is None and ring_degree is None and ulysses_degree is None:
        return auto_layout(world_size, num_heads, guided)
    layout = ParallelLayout(cfg_degree or 1, ring_degree or 1, ulysses_degree or 1)
    return layout.validate(world_size, num_heads, guided, world_label, guidance)


@dataclass
class ParallelMesh:
    """This rank's place in a layout and the process groups it communicates over.

    Groups of degree 1 are None (no communication). `*_ranks` are global ranks, in axis order.
    """

    layout: ParallelLayout
    rank: int
    cfg_index: int
    ring_index: int
    ulysses_index: int
    cfg_group: dist.ProcessGroup | None
    sp_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    ring_ranks: list[int]

    @property
    def sp_index(self) -> int:
        """Position of this rank's token shard in the sequence."""
        return self.ring_index * self.layout.ulysses_degree + self.ulysses_index

    @property
    def ring_next(self) -> int:
        return self.ring_ranks[(self.ring_index + 1) % self.layout.ring_degree]

    @property
    def ring_prev(self) -> int:
        return self.ring_ranks[(self.ring_index - 1) % self.layout.ring_degree]

    @classmethod
    def build(cls, layout: ParallelLayout, ranks: Sequence[int] | None = None) -> "ParallelMesh | None":
        """Create the sub-groups of `layout` over `ranks` (default: the whole default group).

        Collective: every process of the default group must call it with the same arguments (that is
        how torch.distributed creates groups); processes outside `ranks` get None.
        """
        import torch.distributed as dist

        members = list(range(dist.get_world_size())) if ranks is None else list(ranks)
        if len(members) != layout.world_size:
            raise LayoutError(f"layout {layout} needs {layout.world_size} ranks, got {len(members)}")
        c_deg, r_deg, u_deg = layout.cfg_degree, layout.ring_degree, layout.ulysses_degree

        def at(c: int, r: int, u: int) -> int:
            return members[(c * r_deg + r) * u_deg + u]

        me = dist.get_rank()
        groups: dict[str, dist.ProcessGroup | None] = {}

        def make(name: str, group_ranks: list[int]) -> None:
            group = dist.new_group(group_ranks) if len(group_ranks) > 1 else None
            if me in group_ranks:
                groups[name] = group

        for c in range(c_deg):
            make("sp", [at(c, r, u) for r in range(r_deg) for u in range(u_deg)])
            for r in range(r_deg):
                make("ulysses", [at(c, r, u) for u in range(u_deg)])
            for u in range(u_deg):
                make("ring", [at(c, r, u) for r in range(r_deg)])
        for r in range(r_deg):
            for u in range(u_deg):
                make("cfg", [at(c, r, u) for c in range(c_deg)])
        if me not in members:
            return None
        index = members.index(me)
        c, rest = divmod(index, r_deg * u_deg)
        r, u = divmod(rest, u_deg)
        return cls(layout=layout, rank=me, cfg_index=c, ring_index=r, ulysses_index=u,
                   cfg_group=groups.get("cfg"), sp_group=groups.get("sp"), ring_group=groups.get("ring"),
                   ulysses_group=groups.get("ulysses"), ring_ranks=[at(c, i, u) for i in range(r_deg)])
