"""What each stage actor reserves, fitted to the cluster it lands on, and a check that it can fit.

A stage actor's `num_cpus` left unset (None, the default) is derived here at start-up: one CPU
per actor when the cluster has that many, otherwise an equal share of the CPUs the cluster has,
so the service starts on a laptop or a 2-core VM as well as on a GPU node. (Ray then runs a
CPU-only actor with max(1, floor(num_cpus)) torch threads; the share only says how the actors
split the machine.) An explicit number is taken as it is.

`check_fits` then places every placement group of the plan on the cluster's nodes (a STRICT_PACK
group all on one node, PACK bundles anywhere) before anything is reserved, so a configuration
that can never fit fails at once with what it needs and what the cluster has, instead of after
the placement-group timeout.

The planning is pure (dicts in, dicts out) and testable without Ray; `ClusterResources.current()`
is the one place that asks Ray.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Sequence

from actors.config import ServiceConfig

logger = logging.getLogger(__name__)

Resources = dict[str, float]
Strategy = Literal["PACK", "STRICT_PACK"]

_EPS = 1e-9


@dataclass(frozen=True)
class ClusterResources:
    """Total resources of each alive node, less what the calling process itself holds on its node.

    nodes: one {"CPU": ..., "GPU": ...} per node; own_node: the index of the caller's node in
    `nodes` (its own reservation, e.g. the Serve ingress replica's 0.1 CPU, is already taken off).
    """

    nodes: tuple[Mapping[str, float], ...]
    own_node: int | None = None

    @classmethod
    def current(cls) -> "ClusterResources":
        """Read the running Ray cluster (ray.init first)."""
        import ray

        context = ray.get_runtime_context()
        own_id = context.get_node_id()
        try:
            own = context.get_assigned_resources()  # inside an actor: what it reserved
        except Exception:  # noqa: BLE001  # a driver holds nothing
            own = {}
        nodes: list[Mapping[str, float]] = []
        own_index = None
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            resources = {k: float(v) for k, v in node.get("Resources", {}).items() if k in ("CPU", "GPU")}
            if node.get("NodeID") == own_id:
                own_index = len(nodes)
                for key, value in own.items():
                    if key in resources:
                        resources[key] = max(0.0, resources[key] - float(value))
            nodes.append(resources)
        return cls(tuple(nodes), own_index)

    @property
    def total(self) -> Resources:
        out: Resources = {}
        for node in self.nodes:
            for key, value in node.items():
                out[key] = out.get(key, 0.0) + value
        return out


@dataclass(frozen=True)
class PlacementPlan:
    """One placement group the engine will reserve: its name in errors, its bundles, its strategy."""

    name: str
    bundles: tuple[Mapping[str, float], ...]
    strategy: Strategy

    @property
    def need(self) -> Resources:
        return _sum(self.bundles)


@dataclass
class _Node:
    free: Resources = field(default_factory=dict)

    def take(self, need: Mapping[str, float]) -> bool:
        if all(self.free.get(k, 0.0) + _EPS >= v for k, v in need.items()):
            for key, value in need.items():
                self.free[key] = self.free.get(key, 0.0) - value
            return True
        return False


class ResourcesDoNotFit(ValueError):
    """The configured pools cannot be placed on this cluster, whatever else is running."""


def _sections(cfg: ServiceConfig) -> list[tuple[str, int, float | None, float, int, Strategy]]:
    """(section, groups, num_cpus, num_gpus, actors per group, strategy) for the three stage pools."""
    vae_strategy: Strategy = "STRICT_PACK" if cfg.vae.patch_parallel > 1 else "PACK"
    vae_groups, vae_size = ((cfg.vae.replicas, cfg.vae.patch_parallel) if cfg.vae.patch_parallel > 1
                            else (1, cfg.vae.replicas))
    te = cfg.text_encoder
    return [("text_encoder", 1, te.num_cpus, te.num_gpus, te.replicas, "PACK"),
            ("dit", cfg.dit.groups, cfg.dit.num_cpus, cfg.dit.num_gpus, cfg.dit.world_size, "STRICT_PACK"),
            ("vae", vae_groups, cfg.vae.num_cpus, cfg.vae.num_gpus, vae_size, vae_strategy)]


def auto_cpus(cfg: ServiceConfig, cluster: ClusterResources) -> float:
    """num_cpus of an actor whose section leaves it unset: 1, or an equal share of the cluster's CPUs.

    The share is taken so that all the actors fit the cluster's CPUs next to the explicitly configured
    ones and every STRICT_PACK group fits the largest node; it is rounded down to 0.01 so that sums
    never exceed a node.
    """
    fixed = 0.0  # CPUs that explicitly configured actors take
    auto_actors = 0
    biggest_auto_group = 0
    for _, groups, cpus, _, size, strategy in _sections(cfg):
        if cpus is None:
            auto_actors += groups * size
            if strategy == "STRICT_PACK":
                biggest_auto_group = max(biggest_auto_group, size)
        else:
            fixed += groups * size * cpus
    if auto_actors == 0:
        return 1.0
    total_cpus = cluster.total.get("CPU", 0.0)
    largest_node = max((n.get("CPU", 0.0) for n in cluster.nodes), default=0.0)
    shares = [1.0, (total_cpus - fixed) / auto_actors]
    if biggest_auto_group:
        shares.append(largest_node / biggest_auto_group)
    # At least 0.01: when explicit numbers leave nothing, check_fits names what cannot be placed.
    return max(0.01, math.floor(min(shares) * 100 + _EPS) / 100)


def fit_to_cluster(cfg: ServiceConfig, cluster: ClusterResources) -> ServiceConfig:
    """`cfg` with every unset num_cpus replaced by `auto_cpus` (a config without unset ones comes back as is)."""
    if all(cpus is not None for _, _, cpus, _, _, _ in _sections(cfg)):
        return cfg
    share = auto_cpus(cfg, cluster)
    update = {}
    for section in ("text_encoder", "dit", "vae"):
        current = getattr(cfg, section)
        if current.num_cpus is None:
            update[section] = current.model_copy(update={"num_cpus": share})
    fitted = cfg.model_copy(update=update)
    logger.info("automatic num_cpus per stage actor: %g (cluster %s; %s unset)", share, format_resources(cluster.total),
                ", ".join(f"{s}.num_cpus" for s in update))
    return fitted


def bundle_resources(num_cpus: float | None, num_gpus: float, stage: str) -> Resources:
    """The placement-group bundle of one actor; Ray rejects a bundle whose resources are all 0."""
    if num_cpus is None:
        raise ValueError(f"{stage}: num_cpus is unset; resolve the config with fit_to_cluster first (the engine "
                         f"does) or give a number")
    bundle = {k: float(v) for k, v in (("CPU", num_cpus), ("GPU", num_gpus)) if v > 0}
    if not bundle:
        raise ValueError(f"{stage}: num_cpus and num_gpus are both 0, so there is nothing to reserve for an "
                         f"actor; set num_cpus to e.g. 0.5 (CPU) or num_gpus to 1 (GPU)")
    return bundle


def placement_plan(cfg: ServiceConfig) -> list[PlacementPlan]:
    """Every placement group the engine reserves for `cfg` (num_cpus resolved by fit_to_cluster)."""
    plans = []
    for section, groups, cpus, gpus, size, strategy in _sections(cfg):
        bundle = bundle_resources(cpus, gpus, section)
        for index in range(groups):
            name = {"text_encoder": "text_encode pool", "dit": f"DiT group {index}",
                    "vae": f"VAE group {index}" if strategy == "STRICT_PACK" else "decode pool"}[section]
            plans.append(PlacementPlan(name, tuple(dict(bundle) for _ in range(size)), strategy))
    return plans


def check_fits(plans: Sequence[PlacementPlan], cluster: ClusterResources) -> None:
    """Raise ResourcesDoNotFit, naming what is needed and what the cluster has, if `plans` cannot be placed.

    First-fit decreasing over the nodes' totals: each STRICT_PACK group on one node, each PACK bundle
    on any node. This is the cluster's capacity, not what is free right now: resources that other
    work holds are waited for (up to the pools' start-up timeouts).
    """
    nodes = [_Node(dict(n)) for n in cluster.nodes]
    items: list[tuple[str, Resources]] = []
    for plan in plans:
        if plan.strategy == "STRICT_PACK":
            items.append((plan.name, plan.need))
        else:
            items.extend((plan.name, dict(b)) for b in plan.bundles)
    items.sort(key=lambda item: (item[1].get("GPU", 0.0), item[1].get("CPU", 0.0)), reverse=True)
    unplaced = [name for name, need in items if not any(node.take(need) for node in nodes)]
    if not unplaced:
        return
    needs = "; ".join(f"{p.name}: {len(p.bundles)} x {format_resources(dict(p.bundles[0]))}"
                      f"{' on one node' if p.strategy == 'STRICT_PACK' and len(p.bundles) > 1 else ''}"
                      for p in plans)
    largest = max(cluster.nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
    raise ResourcesDoNotFit(
        f"the stage pools need {format_resources(_sum(b for p in plans for b in p.bundles))} ({needs}) but the cluster "
        f"has {format_resources(cluster.total)} in {len(cluster.nodes)} node(s), the largest {format_resources(dict(largest))}, so "
        f"{', '.join(dict.fromkeys(unplaced))} cannot be placed. Leave text_encoder/dit/vae.num_cpus unset "
        f"(automatic), lower replicas/world_size/groups/num_gpus, or add nodes.")


def _sum(bundles: Iterable[Mapping[str, float]]) -> Resources:
    out: Resources = {}
    for bundle in bundles:
        for key, value in bundle.items():
            out[key] = out.get(key, 0.0) + value
    return out


def format_resources(resources: Mapping[str, float]) -> str:
    """{CPU: 2, GPU: 1}, for error messages."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"
