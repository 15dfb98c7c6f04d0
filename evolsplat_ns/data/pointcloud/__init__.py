"""RGB point-cloud generators (LiDAR, depth, hybrid). Each is registered under the entry-point
group ``evolsplat_ns.pointcloud_generators``; build one with ``make_generator(name, **overrides)``."""

from evolsplat_ns.data.pointcloud.base import (
    PointCloudGeneratorConfig,
    RGBPointCloudGenerator,
    make_generator,
)

__all__ = ["PointCloudGeneratorConfig", "RGBPointCloudGenerator", "make_generator"]
