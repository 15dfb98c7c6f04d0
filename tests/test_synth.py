"""Tests of the synthetic driving-scene generator (evolsplat_ns.data.synth, evolsplat-synth).

One tiny scene is generated per module and checked against the drivestudio layout and against
itself: LiDAR vs depth, colours across views, flow vs reprojected depth, masks vs geometry,
instance boxes vs LiDAR points.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("open3d")

from evolsplat_ns.data import layout  # noqa: E402
from evolsplat_ns.data.synth import SynthConfig, generate_dataset, generate_scene  # noqa: E402
from evolsplat_ns.data.synth.render import sky_colour  # noqa: E402
from evolsplat_ns.geometry import OPENCV2DATASET  # noqa: E402

TINY = dict(scenes=1, frames=4, cameras=3, width=128, height=80, lidar_beams=24, lidar_azimuths=360,
            moving_cars=4, seed=3)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return generate_dataset(SynthConfig(**TINY), tmp_path_factory.mktemp("synth"))[0]


class Scene:
    """Read-back of a generated scene (all through layout's readers)."""

    def __init__(self, root: Path):
        self.L = layout.SceneLayout.scan(root)
        self.K = {}
        for c in self.L.cameras:
            fu, fv, cu, cv = layout.read_intrinsics(self.L.intrinsics_path(c))[:4]
            self.K[c] = np.array([[fu, 0, cu], [0, fv, cv], [0, 0, 1]])
        self.cam2veh = {c: layout.read_matrix4(self.L.extrinsics_path(c)) @ OPENCV2DATASET
                        for c in self.L.cameras}
        self.ego = {t: layout.read_matrix4(self.L.ego_pose_path(t)) for t in self.L.frames}
        self.info = layout.read_json(self.L.instances_info_path)
        self.frame_instances = layout.read_json(self.L.frame_instances_path)

    def c2w(self, t: int, c: int) -> np.ndarray:
        """OpenCV camera-to-world [4, 4]."""
        return self.ego[t] @ self.cam2veh[c]

    def depth(self, t: int, c: int) -> np.ndarray:
        return np.load(self.L.depth_path(t, c))

    def project(self, world: np.ndarray, t: int, c: int) -> tuple[np.ndarray, np.ndarray]:
        """World points [N, 3] -> pixel uv [N, 2] and z [N] in camera c at frame t."""
        w2c = np.linalg.inv(self.c2w(t, c))
        cam = world @ w2c[:3, :3].T + w2c[:3, 3]
        uv = cam @ self.K[c].T
        return uv[:, :2] / cam[:, 2:3], cam[:, 2]

    def backproject(self, t: int, c: int) -> tuple[np.ndarray, np.ndarray]:
        """World points [H*W, 3] of every pixel from GT depth, and the pixel centres [H*W, 2]."""
        d = self.depth(t, c)
        H, W = d.shape
        u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
        pix = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3)
        cam = (pix @ np.linalg.inv(self.K[c]).T) * d.reshape(-1, 1)
        c2w = self.c2w(t, c)
        return cam @ c2w[:3, :3].T + c2w[:3, 3], pix[:, :2]

    def lidar_world(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        pts = layout.read_lidar(self.L.lidar_path(t))
        return pts[:, 3:6] @ self.ego[t][:3, :3].T + self.ego[t][:3, 3], pts

    def boxes(self, t: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(obj_to_world [4, 4], size [3]) of the instances annotated at frame t."""
        out = []
        for i in self.frame_instances[str(t)]:
            ann = self.info[str(i)]["frame_annotations"]
            k = ann["frame_idx"].index(t)
            out.append((np.array(ann["obj_to_world"][k]), np.array(ann["box_size"][k])))
        return out

    def sample(self, img: np.ndarray, uv: np.ndarray) -> np.ndarray:
        return img[np.floor(uv[:, 1]).astype(int), np.floor(uv[:, 0]).astype(int)]


def in_image(uv: np.ndarray, z: np.ndarray, W: int, H: int) -> np.ndarray:
    return (z > 0.1) & (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)


def inside_any(points: np.ndarray, boxes, margin: float = 0.05) -> np.ndarray:
    hit = np.zeros(len(points), bool)
    for o2w, size in boxes:
        local = (points - o2w[:3, 3]) @ o2w[:3, :3]
        hit |= np.all(np.abs(local) <= size / 2 + margin, axis=1)
    return hit


def test_layout_complete(scene: Path):
    L = layout.SceneLayout.scan(scene)
    assert L.frames == list(range(TINY["frames"])) and L.cameras == list(range(TINY["cameras"]))
    for modality in ("lidar", "sky_masks", "dynamic_masks", "instances", "depth", "flow"):
        assert L.has(modality), modality
    for c in L.cameras:
        assert layout.read_intrinsics(L.intrinsics_path(c))[4:].tolist() == [0] * 5
        layout.read_matrix4(L.extrinsics_path(c))  # rigid
    for t in L.frames:
        layout.read_matrix4(L.ego_pose_path(t))
        assert len(layout.read_lidar(L.lidar_path(t))) > 1000
        for c in L.cameras:
            assert layout.read_image_size(L.image_path(t, c)) == (TINY["width"], TINY["height"])
            for kind in layout.DYNAMIC_CLASSES:
                mask = layout.read_mask(L.dynamic_mask_path(t, c, kind))
                assert mask.shape == (TINY["height"], TINY["width"])
            depth, flow = np.load(L.depth_path(t, c)), np.load(L.flow_path(t, c))
            assert depth.dtype == np.float32 and depth.shape == (TINY["height"], TINY["width"])
            assert flow.dtype == np.float16 and flow.shape == (TINY["height"], TINY["width"], 2)
    assert not np.any(np.load(L.flow_path(L.frames[-1], 0)))  # no next frame
    assert (scene.parent / "000") == scene


def test_camera_mounts_are_waymo_like(scene: Path):
    s = Scene(scene)
    yaws = {c: np.degrees(np.arctan2(*s.cam2veh[c][[1, 0], 2])) for c in s.L.cameras}  # OpenCV z axis
    assert yaws[0] == pytest.approx(0, abs=1) and yaws[1] == pytest.approx(45, abs=1)
    assert yaws[2] == pytest.approx(-45, abs=1)


def test_deterministic_per_seed(scene: Path, tmp_path: Path):
    again = generate_scene(SynthConfig(**TINY), 0, tmp_path / "same")
    for f in sorted(p for p in scene.rglob("*") if p.is_file()):
        assert (again / f.relative_to(scene)).read_bytes() == f.read_bytes(), f
    other = generate_scene(SynthConfig(**{**TINY, "seed": TINY["seed"] + 1}), 0, tmp_path / "other")
    assert (other / "images/000_0.jpg").read_bytes() != (scene / "images/000_0.jpg").read_bytes()


def test_lidar_agrees_with_depth_and_colours_agree_across_views(scene: Path):
    s = Scene(scene)
    errors, colour_diffs = [], []
    for t in s.L.frames[:-1]:
        world, pts = s.lidar_world(t)
        static = ~np.any(pts[:, 6:9] != 0, axis=1)
        for c in s.L.cameras:
            uv, z = s.project(world, t, c)
            ok = in_image(uv, z, TINY["width"], TINY["height"])
            gt = s.sample(s.depth(t, c), uv[ok])
            rel = np.abs(gt - z[ok]) / z[ok]
            errors.append(rel)
            # Static points seen unoccluded in frame t and t+1 must have the same colour there.
            uv2, z2 = s.project(world, t + 1, c)
            both = ok & in_image(uv2, z2, TINY["width"], TINY["height"]) & static
            vis1 = np.abs(s.sample(s.depth(t, c), uv[both]) - z[both]) < 0.01 * z[both]
            vis2 = np.abs(s.sample(s.depth(t + 1, c), uv2[both]) - z2[both]) < 0.01 * z2[both]
            keep = np.flatnonzero(both)[vis1 & vis2]
            img1 = layout.read_image(s.L.image_path(t, c)).astype(float)
            img2 = layout.read_image(s.L.image_path(t + 1, c)).astype(float)
            colour_diffs.append(np.abs(s.sample(img1, uv[keep]) - s.sample(img2, uv2[keep])).mean(1))
    rel, diffs = np.concatenate(errors), np.concatenate(colour_diffs)
    assert len(rel) > 500 and np.median(rel) < 0.02
    assert len(diffs) > 200 and np.median(diffs) < 12


def test_sky_mask_is_depth_zero_and_sky_colour(scene: Path):
    s = Scene(scene)
    for t in s.L.frames:
        for c in s.L.cameras:
            sky = layout.read_mask(s.L.sky_mask_path(t, c))
            assert np.array_equal(sky, s.depth(t, c) == 0)
            if c == 0:  # looking down the street: sky above, road below
                assert sky.any() and (~sky).any()
    # Sky colour is a gradient by elevation; world z is the street's up axis.
    _, pix = s.backproject(0, 0)
    dirs = np.concatenate([pix, np.ones((len(pix), 1))], 1) @ np.linalg.inv(s.K[0]).T @ s.c2w(0, 0)[:3, :3].T
    sky = layout.read_mask(s.L.sky_mask_path(0, 0)).reshape(-1)
    img = layout.read_image(s.L.image_path(0, 0)).reshape(-1, 3).astype(float)
    assert np.median(np.abs(img[sky] - 255 * sky_colour(dirs[sky]))) < 4


def test_flow_matches_reprojected_depth(scene: Path):
    s = Scene(scene)
    for t in s.L.frames[:-1]:
        for c in s.L.cameras:
            world, pix = s.backproject(t, c)
            flow = np.load(s.L.flow_path(t, c)).astype(np.float64).reshape(-1, 2)
            dyn = layout.read_mask(s.L.dynamic_mask_path(t, c)).reshape(-1)
            static = (s.depth(t, c).reshape(-1) > 0) & ~dyn
            uv, z = s.project(world[static], t + 1, c)
            ahead = z > 0.1
            err = np.linalg.norm(uv[ahead] - pix[static][ahead] - flow[static][ahead], axis=1)
            tol = 0.02 + 2e-3 * np.linalg.norm(flow[static][ahead], axis=1)  # float16 flow
            assert np.all(err < tol), (t, c, err.max())
            if dyn.any():  # moving cars: carry points with their instance box
                moved = np.zeros((dyn.sum(), 3))
                pts, assigned = world[dyn], np.zeros(dyn.sum(), bool)
                for (o2w, size), (o2w_next, _) in _same_instances(s, t):
                    inside = inside_any(pts, [(o2w, size)]) & ~assigned
                    step = o2w_next @ np.linalg.inv(o2w)
                    moved[inside] = pts[inside] @ step[:3, :3].T + step[:3, 3]
                    assigned |= inside
                assert assigned.all()
                uv, z = s.project(moved, t + 1, c)
                err = np.linalg.norm(uv - pix[dyn] - flow[dyn], axis=1)
                ahead = z > 0.1
                assert np.all(err[ahead] < 0.05 + 2e-3 * np.abs(flow[dyn][ahead]).sum(1))


def _same_instances(s: Scene, t: int):
    """Pairs of (box at t, box at t+1) for moving instances annotated in both frames."""
    for i in s.frame_instances[str(t)]:
        ann = s.info[str(i)]["frame_annotations"]
        if t + 1 in ann["frame_idx"]:
            a, b = ann["frame_idx"].index(t), ann["frame_idx"].index(t + 1)
            o2w, o2w_next = np.array(ann["obj_to_world"][a]), np.array(ann["obj_to_world"][b])
            if not np.allclose(o2w, o2w_next):
                yield (o2w, np.array(ann["box_size"][a])), (o2w_next, None)


def test_dynamic_masks_cover_moving_cars(scene: Path):
    s = Scene(scene)
    covered, total = 0, 0
    for t in s.L.frames:
        world, pts = s.lidar_world(t)
        moving = np.any(pts[:, 6:9] != 0, axis=1)
        for c in s.L.cameras:
            dyn = layout.read_mask(s.L.dynamic_mask_path(t, c))
            assert not layout.read_mask(s.L.dynamic_mask_path(t, c, "human")).any()
            assert np.array_equal(dyn, layout.read_mask(s.L.dynamic_mask_path(t, c, "vehicle")))
            uv, z = s.project(world[moving], t, c)
            ok = in_image(uv, z, TINY["width"], TINY["height"])
            visible = np.abs(s.sample(s.depth(t, c), uv[ok]) - z[ok]) < 0.01 * z[ok]
            covered += s.sample(dyn, uv[ok][visible]).sum()
            total += visible.sum()
            # And every dynamic pixel lies on a moving box.
            pix_world, _ = s.backproject(t, c)
            moving_boxes = [b for b, _ in _same_instances(s, t)] if t + 1 in s.L.frames else []
            if moving_boxes:
                assert inside_any(pix_world[dyn.reshape(-1)], moving_boxes).all()
    assert total > 20 and covered / total > 0.97


def test_instance_boxes_contain_moving_lidar_points(scene: Path):
    s = Scene(scene)
    n_moving = 0
    for t in s.L.frames:
        world, pts = s.lidar_world(t)
        moving = np.any(pts[:, 6:9] != 0, axis=1)
        assert np.all(pts[moving, 9] == 1)  # flow class vehicle
        boxes = s.boxes(t)
        assert inside_any(world[moving], boxes).all()
        n_moving += moving.sum()
        # LiDAR flow is the box velocity (m/s) in vehicle axes.
        for (o2w, size), (o2w_next, _) in _same_instances(s, t) if t + 1 in s.L.frames else []:
            inside = moving & inside_any(world, [(o2w, size)])
            if inside.any():
                v_world = (o2w_next[:3, 3] - o2w[:3, 3]) * 10.0  # 10 fps
                v_vehicle = s.ego[t][:3, :3].T @ v_world
                assert np.allclose(pts[inside, 6:9], v_vehicle, atol=1e-3)
    assert n_moving > 50
    poses = [i["frame_annotations"]["obj_to_world"] for i in s.info.values()]
    parked = [p for p in poses if np.allclose(p[0], p[-1])]
    assert parked and all(i["class_name"] == "Vehicle" for i in s.info.values())


def test_cli_refuses_to_overwrite(tmp_path: Path, capsys):
    from evolsplat_ns.cli.synth import entrypoint

    argv = ["--out", str(tmp_path), "--frames", "2", "--cameras", "1", "--width", "32", "--height", "24",
            "--lidar-beams", "4", "--lidar-azimuths", "32", "--seed", "1"]
    entrypoint(argv)
    assert "wrote 1 scene" in capsys.readouterr().out
    before = (tmp_path / "000/images/000_0.jpg").read_bytes()
    with pytest.raises(SystemExit) as exc:
        entrypoint(argv[:-1] + ["2"])
    err = capsys.readouterr().err
    assert exc.value.code != 0 and str(tmp_path / "000") in err and "--overwrite" in err
    assert (tmp_path / "000/images/000_0.jpg").read_bytes() == before
    entrypoint(argv[:-1] + ["2", "--overwrite"])
    assert (tmp_path / "000/images/000_0.jpg").read_bytes() != before


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="SynthConfig.cameras"):
        SynthConfig(cameras=13)  # rigs of up to 12 cameras exist since issue 12 (6 used to be refused)


RING = dict(scenes=1, frames=1, cameras=6, width=61, height=45, lidar_beams=24, lidar_azimuths=720,
            moving_cars=2, seed=5)


@pytest.fixture(scope="module")
def ring_scene(tmp_path_factory) -> Path:
    return generate_dataset(SynthConfig(**RING), tmp_path_factory.mktemp("ring"))[0]


def test_ring_rig_faces_every_way_and_is_named(ring_scene: Path):
    """6 cameras 60 degrees apart, the last looking back; names written to cameras.json."""
    s = Scene(ring_scene)
    yaws = [np.degrees(np.arctan2(*s.cam2veh[c][[1, 0], 2])) for c in s.L.cameras]
    assert np.allclose(yaws[:5], [0, 60, -60, 120, -120], atol=1) and abs(abs(yaws[5]) - 180) < 1
    assert s.L.camera_names() == {0: "FRONT", 1: "LEFT_60", 2: "RIGHT_60", 3: "LEFT_120", 4: "RIGHT_120",
                                  5: "REAR"}


def test_lidar_lands_on_gt_depth_in_every_ring_camera(ring_scene: Path):
    """The foundation's geometric check, per camera of the 6-camera rig (rear included)."""
    s = Scene(ring_scene)
    world, _ = s.lidar_world(0)
    for c in s.L.cameras:
        uv, z = s.project(world, 0, c)
        ok = in_image(uv, z, RING["width"], RING["height"])
        rel = np.abs(s.sample(s.depth(0, c), uv[ok]) - z[ok]) / z[ok]
        assert ok.sum() > 100 and np.median(rel) < 0.02, (c, int(ok.sum()), float(np.median(rel)))
