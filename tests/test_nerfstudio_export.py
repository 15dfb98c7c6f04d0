"""evolsplat-data export-nerfstudio: nerfstudio's own parser reads the export, with our split and our frames."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def exported(tiny_dataset, tmp_path_factory) -> Path:
    from evolsplat_ns.cli.data import main

    out = tmp_path_factory.mktemp("ns_export") / "scene000"
    assert main(["export-nerfstudio", "--data", str(tiny_dataset / "000"), "--out", str(out),
                 "--masks", "dynamic"]) == 0
    return out


def _parse(data: Path, split: str, keep_frame: bool):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    extra = dict(orientation_method="none", center_method="none", auto_scale_poses=False) if keep_frame else {}
    return NerfstudioDataParserConfig(data=data, load_3D_points=True, downscale_factor=1, **extra).setup() \
        .get_dataparser_outputs(split=split)


def test_split_images_and_masks(exported, tiny_dataset):
    meta = json.loads((exported / "transforms.json").read_text())
    held = meta["evolsplat"]["held_out_frames"]
    assert held == [2, 6, 10]  # every 4th of 12 frames from offset 2, as the dataset holds out
    train, test = _parse(exported, "train", True), _parse(exported, "test", True)
    assert len(train.image_filenames) == (12 - 3) * 3 and len(test.image_filenames) == 3 * 3
    assert {int(p.name[:3]) for p in test.image_filenames} == set(held)
    assert not {int(p.name[:3]) for p in train.image_filenames} & set(held)
    assert len(train.mask_filenames) == len(train.image_filenames)
    # Images are links or copies of the source's bytes; the source is untouched.
    src = tiny_dataset / "000" / "images" / "002_1.jpg"
    assert (exported / "images" / "002_1.jpg").read_bytes() == src.read_bytes()
    assert os.stat(src).st_nlink >= 1
    assert int(train.cameras.width[0]) == 64 and int(train.cameras.height[0]) == 48
    assert train.metadata["points3D_xyz"].shape[0] > 100


@pytest.mark.parametrize("keep_frame", [True, False], ids=["frame-kept", "auto-orient-scale"])
def test_lidar_point_on_its_pixel_ray(exported, tiny_dataset, keep_frame):
    """A held-out frame's LiDAR point lies on the nerfstudio ray of the pixel our projection gives,
    in the export frame or (nerfstudio's default) after its dataparser transform and scale."""
    from evolsplat_ns.data.scene import SceneData
    from evolsplat_ns.geometry import invert_rigid, project_points

    meta = json.loads((exported / "transforms.json").read_text())
    frame_from_world = np.linalg.inv(np.array(meta["evolsplat"]["frame_to_world"]))
    scene = SceneData(tiny_dataset / "000")
    t, cam = 6, 1
    views = scene.load_views([t], frame_from_world, cameras=[cam])
    pts = scene.load_lidar([t], frame_from_world).points
    uv, z = project_points(pts, views.intrinsics, invert_rigid(views.camtoworlds))
    inside = (z[0] > 1) & (uv[0, :, 0] > 0) & (uv[0, :, 0] < 64) & (uv[0, :, 1] > 0) & (uv[0, :, 1] < 48)
    p, (u, v) = pts[inside][0].double(), uv[0][inside][0].tolist()

    out = _parse(exported, "test", keep_frame)
    i = [k for k, f in enumerate(out.image_filenames) if f.name == f"{t:03d}_{cam}.jpg"][0]
    rays = out.cameras.generate_rays(camera_indices=i, coords=torch.tensor([[v, u]]))
    T = out.dataparser_transform.double()
    p_ns = out.dataparser_scale * (T[:, :3] @ p + T[:, 3])
    if keep_frame:
        assert torch.allclose(T, torch.eye(4)[:3].double()) and out.dataparser_scale == 1.0
    o, d = rays.origins.reshape(3).double(), rays.directions.reshape(3).double()
    along = (p_ns - o) @ d
    miss = (p_ns - o - along * d).norm()
    assert along > 0 and miss < 1e-3 * out.dataparser_scale * float(z[0][inside][0]), float(miss)


def test_refuses_non_empty_out(tiny_dataset, tmp_path):
    from evolsplat_ns.cli.data import main

    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export-nerfstudio", "--data", str(tiny_dataset / "000"), "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert main(["export-nerfstudio", "--data", str(tiny_dataset), "--out", str(tmp_path / "x")]) == 2  # 3 scenes
    assert not (tmp_path / "x").exists()
