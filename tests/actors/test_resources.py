"""Stage actors' resources fitted to the cluster, and the up-front check that a configuration can fit."""

from __future__ import annotations

import time

import pytest

from actors.config import ServiceConfig
from actors.resources import ClusterResources, ResourcesDoNotFit, check_fits, fit_to_cluster, placement_plan


def _cfg(**overrides: object) -> ServiceConfig:
    return ServiceConfig.load(overrides=overrides)


def test_defaults_on_a_two_core_machine_share_its_cpus() -> None:
    """2 CPUs, of which the ingress replica holds 0.1: three stage actors get 1.9 / 3, rounded down."""
    cluster = ClusterResources(({"CPU": 1.9},), own_node=0)
    cfg = fit_to_cluster(_cfg(), cluster)
    assert cfg.text_encoder.num_cpus == cfg.dit.num_cpus == cfg.vae.num_cpus == 0.63
    check_fits(placement_plan(cfg), cluster)


def test_defaults_on_a_large_node_are_one_cpu_each() -> None:
    cfg = fit_to_cluster(_cfg(**{"vae.replicas": 2}), ClusterResources(({"CPU": 64.0, "GPU": 8.0},)))
    assert (cfg.text_encoder.num_cpus, cfg.dit.num_cpus, cfg.vae.num_cpus) == (1.0, 1.0, 1.0)


def test_a_strict_pack_group_must_fit_the_largest_node() -> None:
    """4 DiT ranks on two 2-CPU nodes: the share is bounded by 2 CPUs / 4 ranks, not by 4 CPUs / 6 actors."""
    cluster = ClusterResources(({"CPU": 2.0}, {"CPU": 2.0}))
    cfg = fit_to_cluster(_cfg(**{"dit.world_size": 4}), cluster)
    assert cfg.dit.num_cpus == 0.5
    check_fits(placement_plan(cfg), cluster)


def test_explicit_values_are_kept_and_counted() -> None:
    cluster = ClusterResources(({"CPU": 4.0},))
    cfg = fit_to_cluster(_cfg(**{"dit.num_cpus": 2.5}), cluster)
    assert cfg.dit.num_cpus == 2.5
    assert cfg.text_encoder.num_cpus == cfg.vae.num_cpus == 0.75  # (4 - 2.5) / 2
    untouched = _cfg(**{"dit.num_cpus": 1, "vae.num_cpus": 1, "text_encoder.num_cpus": 1})
    assert fit_to_cluster(untouched, cluster) is untouched


def test_plan_names_every_placement_group() -> None:
    cfg = fit_to_cluster(_cfg(**{"dit.groups": 2, "dit.world_size": 2, "vae.replicas": 2, "vae.patch_parallel": 2}),
                         ClusterResources(({"CPU": 16.0},)))
    plans = {p.name: (len(p.bundles), p.strategy) for p in placement_plan(cfg)}
    assert plans == {"text_encode pool": (1, "PACK"), "DiT group 0": (2, "STRICT_PACK"),
                     "DiT group 1": (2, "STRICT_PACK"), "VAE group 0": (2, "STRICT_PACK"),
                     "VAE group 1": (2, "STRICT_PACK")}
    with pytest.raises(ValueError, match="text_encoder: num_cpus is unset"):
        placement_plan(_cfg())


def test_what_cannot_fit_is_named() -> None:
    cluster = ClusterResources(({"CPU": 2.0},))
    too_big = fit_to_cluster(_cfg(**{"dit.num_cpus": 1, "text_encoder.num_cpus": 1, "vae.num_cpus": 1}), cluster)
    with pytest.raises(ResourcesDoNotFit, match=r"need \{CPU: 3\}.*cluster has \{CPU: 2\} in 1 node"):
        check_fits(placement_plan(too_big), cluster)
    # Enough CPUs in total, but a STRICT_PACK group cannot be split over two nodes.
    split = ClusterResources(({"CPU": 2.0}, {"CPU": 2.0}))
    group = fit_to_cluster(_cfg(**{"dit.world_size": 3, "dit.num_cpus": 1}), split)
    with pytest.raises(ResourcesDoNotFit, match="DiT group 0 cannot be placed"):
        check_fits(placement_plan(group), split)
    gpus = fit_to_cluster(_cfg(**{"dit.num_gpus": 1}), cluster)
    with pytest.raises(ResourcesDoNotFit, match="GPU: 1"):
        check_fits(placement_plan(gpus), cluster)


def test_no_cpus_left_for_automatic_actors() -> None:
    cluster = ClusterResources(({"CPU": 2.0},))
    cfg = fit_to_cluster(_cfg(**{"dit.num_cpus": 2}), cluster)
    assert cfg.text_encoder.num_cpus == cfg.vae.num_cpus == 0.01
    with pytest.raises(ResourcesDoNotFit, match="text_encode pool, decode pool cannot be placed"):
        check_fits(placement_plan(cfg), cluster)


@pytest.mark.slow
def test_engine_refuses_a_configuration_that_cannot_fit_at_once(ray_cluster: None, tiny_model: str,
                                                                tmp_path: object) -> None:
    """No placement group is created (nothing waits for the start-up timeout): the error comes in the constructor."""
    from actors.engine import StageEngine

    cfg = _cfg(model=tiny_model, job_store=f"{tmp_path}/jobs.sqlite", output_dir=f"{tmp_path}/out",
               **{"dit.num_cpus": 100})
    began = time.monotonic()
    with pytest.raises(ResourcesDoNotFit, match="DiT group 0 cannot be placed"):
        StageEngine(cfg)
    assert time.monotonic() - began < 10
    assert ClusterResources.current().total["CPU"] == 8.0  # the test session's cluster, nothing reserved by us
