"""Plugin registry: built-in components found through entry points, clear errors, runtime registration."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from evolsplat_ns import registry
from evolsplat_ns.data.pointcloud import PointCloudGeneratorConfig, RGBPointCloudGenerator, make_generator
from evolsplat_ns.data.pointcloud.depth import DepthPointCloudGenerator
from evolsplat_ns.data.pointcloud.hybrid import HybridPointCloudGenerator
from evolsplat_ns.data.pointcloud.lidar import LidarPointCloudGenerator

BUILTIN_GENERATORS = {
    "lidar": LidarPointCloudGenerator,
    "depth": DepthPointCloudGenerator,
    "hybrid": HybridPointCloudGenerator,
}


def test_builtin_generators_are_listed_and_build():
    assert set(BUILTIN_GENERATORS) <= set(registry.available("pointcloud_generators"))
    for name, cls in BUILTIN_GENERATORS.items():
        gen = make_generator(name, voxel_size=0.2)
        assert type(gen) is cls
        assert gen.config.voxel_size == 0.2


RESERVED = {"dynamic_segmenters", "flow_estimators", "refine_heads"}
"""Groups reserved for the stage-2 refiner: no built-ins yet (docs/plugins.md)."""


@pytest.mark.parametrize("kind", sorted(set(registry.GROUPS) - RESERVED))
def test_every_registered_builtin_loads(kind):
    names = registry.available(kind)
    assert names, f"group {kind} has no entry point: is evolsplat-ns installed (pip install -e .)?"
    for name in names:
        assert registry.get(kind, name) is not None, f"{kind}/{name}"


def test_reserved_groups_are_the_only_empty_ones():
    assert {kind for kind in registry.GROUPS if not registry.available(kind)} <= RESERVED


def test_example_plugin_is_installed_and_found():
    """plugins/evolsplat-edge-loss, installed by the README's test command, reaches evolsplat-ns
    only through its entry point; the registry finds and loads it like a built-in."""
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group=registry.GROUPS["losses"]) if e.name == "l1_edge"]
    assert eps, "the example plugin is not installed: run bash scripts/test.sh (it installs plugins/*)"
    assert eps[0].dist.name == "evolsplat-edge-loss" and eps[0].value.startswith("evolsplat_edge_loss.")
    loss = registry.get("losses", "l1_edge")
    img = torch.rand(8, 8, 3)
    assert float(loss(img, img, 0.2)) == 0.0 and float(loss(img, 1 - img, 0.2)) > 0


def test_broken_entry_point_names_itself(monkeypatch):
    from importlib.metadata import EntryPoint

    broken = EntryPoint("ghost", "evolsplat_ns.registry:NoSuchThing", registry.GROUPS["losses"])
    monkeypatch.setattr(registry, "entry_points", lambda group: [broken] if group == broken.group else [])
    with pytest.raises(registry.UnknownComponentError, match=r"'ghost' = 'evolsplat_ns.registry:NoSuchThing'.*"
                       r"cannot be loaded.*NoSuchThing"):
        registry.get("losses", "ghost")


def test_unknown_name_lists_available():
    with pytest.raises(registry.UnknownComponentError) as err:
        registry.get("pointcloud_generators", "no_such_generator")
    msg = str(err.value)
    assert "'no_such_generator'" in msg
    for name in BUILTIN_GENERATORS:
        assert name in msg
    assert "evolsplat_ns.pointcloud_generators" in msg  # tells third parties where to register


def test_unknown_kind_lists_kinds():
    with pytest.raises(registry.UnknownComponentError, match="unknown component kind 'nope'.*pointcloud_generators"):
        registry.available("nope")


@dataclass
class _ConstantConfig(PointCloudGeneratorConfig):
    """A third-party style generator config registered at runtime."""

    def setup(self, **kwargs) -> RGBPointCloudGenerator:
        return RGBPointCloudGenerator(self)


def test_runtime_register_then_unregister():
    registry.register("pointcloud_generators", "test_constant", _ConstantConfig)
    try:
        assert "test_constant" in registry.available("pointcloud_generators")
        gen = make_generator("test_constant", frame_stride=3)
        assert gen.config.frame_stride == 3 and isinstance(gen.config, _ConstantConfig)
    finally:
        registry.unregister("pointcloud_generators", "test_constant")
    assert "test_constant" not in registry.available("pointcloud_generators")


def test_runtime_registration_overrides_entry_point():
    sentinel = object()
    registry.register("pointcloud_generators", "lidar", sentinel)
    try:
        assert registry.get("pointcloud_generators", "lidar") is sentinel
    finally:
        registry.unregister("pointcloud_generators", "lidar")
    assert registry.get("pointcloud_generators", "lidar") is not sentinel
