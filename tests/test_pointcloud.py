"""RGB point-cloud generators (lidar, depth, hybrid) on a synthetic scene, and their shared filters:
range, colours, voxel downsampling, sky filtering, sparsity, and the split of moving cars into
object-local clouds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from evolsplat_ns.data import layout as L
from evolsplat_ns.data.pointcloud import make_generator, ops
from evolsplat_ns.data.pointcloud.base import moving_instances
from evolsplat_ns.data.pointcloud.depth import unproject_depth
from evolsplat_ns.data.scene import SceneData
from evolsplat_ns.data.types import Views
from evolsplat_ns.geometry import invert_rigid, project_points

FRAMES = [0, 1, 2, 3]
# Every filter off: what a generator's raw points become, for exact counting.
UNFILTERED = dict(voxel_size=0.0, outlier_removal="none", crop_radius=0.0, crop_z=(-1e9, 1e9))


@pytest.fixture(scope="module")
def scene(tiny_dataset) -> SceneData:
    return SceneData(tiny_dataset / "000")


@pytest.fixture(scope="module")
def clouds(scene) -> dict:
    """Default-settings clouds of FRAMES from each built-in generator (built once: they are the slow part)."""
    options = {"lidar": {}, "depth": {"pixel_stride": 2}, "hybrid": {"pixel_stride": 2}}
    return {name: make_generator(name, **kw).generate(scene, FRAMES) for name, kw in options.items()}


def _segment_path(scene: SceneData, frames: list[int]) -> np.ndarray:
    """[F, 3] ego positions of ``frames`` in the segment frame (vehicle frame at ``frames[0]``)."""
    seg_from_world = np.linalg.inv(scene.ego_to_world[frames[0]])
    return np.stack([(seg_from_world @ scene.ego_to_world[t])[:3, 3] for t in frames])


@pytest.mark.parametrize("name", ["lidar", "depth", "hybrid"])
def test_generators_give_coloured_points_in_range(scene, clouds, name):
    pc = clouds[name]
    cfg = make_generator(name).config
    assert len(pc) > 500 and pc.points.dtype == torch.float32 and torch.isfinite(pc.points).all()
    assert pc.colors.shape == pc.points.shape and 0 <= pc.colors.min() and pc.colors.max() <= 1
    assert pc.colors.std() > 0.05  # real texture, not one flat colour
    z = pc.points[:, 2]
    assert cfg.crop_z[0] <= z.min() and z.max() <= cfg.crop_z[1]
    path = torch.from_numpy(_segment_path(scene, FRAMES)[:, :2]).float()
    assert torch.cdist(pc.points[:, :2], path).min(1).values.max() <= cfg.crop_radius + 1e-3
    assert pc.metadata["frames"] == FRAMES and pc.metadata["points"] == len(pc)
    assert (z < 0.5).float().mean() > 0.1  # the road is there, near z = 0 in the segment (vehicle) frame


def test_hybrid_is_lidar_plus_depth(clouds):
    raw = {k: clouds[k].metadata["raw_points"] for k in clouds}
    assert raw["hybrid"] == raw["lidar"] + raw["depth"]


def test_lidar_colours_match_image_pixels(scene):
    """Each coloured LiDAR point, taken to the world (segment_to_world) and projected with SceneData's
    world poses into a camera whose rendered depth shows it, has that pixel's colour."""
    gen = make_generator("lidar", **UNFILTERED, split_dynamic=False)
    seg_to_world = scene.ego_to_world[FRAMES[0]]
    pts, rgb, fids = gen.raw_points(scene, FRAMES, np.linalg.inv(seg_to_world))
    world = pts.double() @ torch.from_numpy(seg_to_world[:3, :3]).T + torch.from_numpy(seg_to_world[:3, 3])
    errors = []
    for t in FRAMES:
        sel = fids == t
        views = scene.load_views([t], np.eye(4), depth=True)
        uv, z = project_points(world[sel], views.intrinsics.double(), invert_rigid(views.camtoworlds.double()))
        best = torch.full((int(sel.sum()),), float("inf"), dtype=torch.float64)
        for c in range(len(views)):
            ix = uv[c, :, 0].floor().long().clamp(0, views.width - 1)
            iy = uv[c, :, 1].floor().long().clamp(0, views.height - 1)
            inside = (z[c] > 0) & (uv[c, :, 0] >= 0) & (uv[c, :, 0] < views.width) \
                & (uv[c, :, 1] >= 0) & (uv[c, :, 1] < views.height)
            visible = inside & ((z[c] - views.depths[c][iy, ix]).abs() < 0.05 * z[c])
            err = (views.images[c][iy, ix] - rgb[sel]).abs().amax(-1).double()
            best = torch.where(visible, torch.minimum(best, err), best)
        errors.append(best)
    errors = torch.cat(errors)
    checked = torch.isfinite(errors)
    assert checked.float().mean() > 0.85  # nearly every coloured point is visible by the GT depth
    assert (errors[checked] < 1 / 255).float().mean() > 0.97


def test_voxel_downsampling_reduces_points(scene):
    fine = make_generator("lidar", voxel_size=0.0, outlier_removal="none").generate(scene, FRAMES[:2])
    coarse = make_generator("lidar", voxel_size=0.5, outlier_removal="none").generate(scene, FRAMES[:2])
    assert len(coarse) < 0.8 * len(fine)
    cells = torch.floor((fine.points - fine.points.min(0).values) / 0.5)
    assert torch.unique(cells, dim=0).shape[0] == len(coarse)  # one point per occupied voxel


def test_voxel_downsample_averages_per_voxel():
    pts = torch.tensor([[0.1, 0.1, 0.1], [0.3, 0.3, 0.3], [1.5, 0.1, 0.1]])
    rgb = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    p, c = ops.voxel_downsample(pts, rgb, 1.0)
    order = p[:, 0].argsort()
    torch.testing.assert_close(p[order], torch.tensor([[0.2, 0.2, 0.2], [1.5, 0.1, 0.1]]))
    torch.testing.assert_close(c[order], torch.tensor([[0.5, 0.5, 0], [0, 0, 1.0]]))


def test_sparse_voxel_mask_drops_strays():
    pts = torch.cat([torch.rand(20, 3) * 0.4, torch.tensor([[10.0, 10, 10]])])
    assert ops.sparse_voxel_mask(pts, 0.5, 2).tolist() == [True] * 20 + [False]


def test_statistical_outlier_removal_drops_a_far_point():
    pts = torch.cat([torch.rand(200, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([[30.0, 0, 0]])])
    keep = ops.statistical_outlier_mask(pts, 8, 2.0)
    assert not keep[-1] and keep[:-1].float().mean() > 0.9


@pytest.fixture
def all_sky_scene(tiny_dataset, tmp_path) -> SceneData:
    """A copy of scene 000 whose sky masks of FRAMES mark every pixel as sky."""
    root = Path(shutil.copytree(tiny_dataset / "000", tmp_path / "000"))
    lay = L.SceneLayout.scan(root)
    for t in FRAMES[:2]:
        for c in lay.cameras:
            L.write_mask(lay.sky_mask_path(t, c), np.ones((8, 8), bool))  # resized to the image on load
    return SceneData(root)


@pytest.mark.parametrize("name", ["lidar", "depth"])
def test_sky_filter_drops_points_on_sky(all_sky_scene, name):
    kept = make_generator(name, filter_sky=False, **UNFILTERED).generate(all_sky_scene, FRAMES[:2])
    assert len(kept) > 500
    with pytest.warns(UserWarning, match="no points survive point-cloud generation"):
        filtered = make_generator(name, filter_sky=True, **UNFILTERED).generate(all_sky_scene, FRAMES[:2])
    assert len(filtered) == 0


def test_colorize_skips_sky_and_occluded_points():
    K = torch.tensor([[[10.0, 0, 5], [0, 10, 5], [0, 0, 1]]])
    pose = torch.eye(4)[None]  # camera at the origin looking along +z
    image = torch.rand(1, 10, 10, 3)
    pts = torch.tensor([[0.0, 0, 2], [0, 0, 4], [0.3, 0.3, 2]])  # the second hides behind the first
    sky = torch.zeros(1, 10, 10, dtype=torch.bool)
    sky[0, 6, 6] = True  # the third point's pixel: u = v = 10 * 0.3 / 2 + 5 = 6.5
    colors, seen = ops.colorize(pts, image, K, pose, sky_masks=sky)
    assert seen.tolist() == [True, False, False]
    torch.testing.assert_close(colors[0], image[0, 5, 5])


def test_unproject_depth_inverts_projection():
    K = torch.tensor([[[20.0, 0, 8], [0, 20, 6], [0, 0, 1]]])
    c2w = torch.eye(4)[None].clone()
    c2w[0, :3, 3] = torch.tensor([1.0, 2.0, 3.0])
    depth = torch.full((1, 12, 16), 5.0)
    sky = torch.zeros(1, 12, 16, dtype=torch.bool)
    sky[0, :6] = True
    views = Views(images=torch.rand(1, 12, 16, 3), intrinsics=K, camtoworlds=c2w, frame_ids=torch.tensor([0]),
                  cam_ids=torch.tensor([0]), depths=depth, sky_masks=sky)
    pts, rgb, vid = unproject_depth(views, pixel_stride=1, max_depth=80.0)
    assert pts.shape == (6 * 16, 3)  # the sky half is skipped
    uv, z = project_points(pts, K, invert_rigid(c2w))
    torch.testing.assert_close(z[0], torch.full((96,), 5.0))
    assert torch.allclose(uv[0] - uv[0].floor(), torch.tensor(0.5))  # pixel centres
    assert (vid == 0).all() and rgb.shape == (96, 3)


def test_frame_stride_and_keep_fraction(scene):
    full = make_generator("lidar", **UNFILTERED, split_dynamic=False).generate(scene, FRAMES)
    strided = make_generator("lidar", frame_stride=2, **UNFILTERED, split_dynamic=False).generate(scene, FRAMES)
    assert strided.metadata["frames"] == FRAMES[::2]
    assert 0.4 * len(full) < len(strided) < 0.6 * len(full)
    half = make_generator("lidar", keep_fraction=0.5, **UNFILTERED, split_dynamic=False).generate(scene, FRAMES)
    assert len(half) == round(0.5 * len(full))
    # The kept half is a subset of the full cloud (same points, no new ones).
    full_set = {tuple(p) for p in full.points.numpy().round(4).tolist()}
    assert all(tuple(p) in full_set for p in half.points.numpy().round(4).tolist())


def test_moving_cars_split_into_object_local_clouds(scene):
    info = json.loads(scene.layout.instances_info_path.read_text())
    moving = moving_instances(scene, FRAMES, threshold=0.5)
    assert moving and set(moving) < set(info)  # parked cars are instances too, but static
    split = make_generator("lidar", **UNFILTERED, split_dynamic=True).generate(scene, FRAMES)
    whole = make_generator("lidar", **UNFILTERED, split_dynamic=False).generate(scene, FRAMES)
    assert split.dynamic and set(split.dynamic) <= set(moving)
    n_dynamic = sum(p.shape[0] for p, _ in split.dynamic.values())
    assert n_dynamic > 20
    assert len(split) + n_dynamic == len(whole)  # moved out of the background, none lost
    for inst_id, (local, rgb) in split.dynamic.items():
        size = torch.tensor(info[inst_id]["frame_annotations"]["box_size"][0])
        assert (local.abs() <= size / 2 + 0.1 + 1e-4).all()  # 0.1 m is points_in_box's margin
        assert local.shape == rgb.shape and 0 <= rgb.min() and rgb.max() <= 1
        # The car's body fills its box, so its points are not just a thin slice of it.
        assert (local.amax(0) - local.amin(0) > 0.3 * size).all()


def test_lidar_generator_needs_lidar(tiny_dataset, tmp_path):
    root = Path(shutil.copytree(tiny_dataset / "001", tmp_path / "001"))
    shutil.rmtree(root / "lidar")
    with pytest.raises(L.DatasetError, match=r"lidar/000.bin: missing LiDAR \(use the 'depth'"):
        make_generator("lidar").generate(SceneData(root), FRAMES)
