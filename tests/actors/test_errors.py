"""What users see of an error raised inside a stage actor: its type and first line, never Ray's traceback."""

from __future__ import annotations

import pytest

from actors.errors import error_headline


def test_headline_of_a_local_error() -> None:
    assert error_headline(ValueError("height is odd\nmore detail")) == "ValueError: height is odd"


def test_headline_of_an_error_raised_in_an_actor(ray_cluster: None) -> None:
    import ray

    @ray.remote(num_cpus=0)
    def fails() -> None:
        raise MemoryError("out of memory on the device\nsecond line")

    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(fails.remote())
    assert "File " in str(caught.value) and "ray::fails" in str(caught.value)  # what Ray's own message carries
    assert error_headline(caught.value) == "MemoryError: out of memory on the device"
