"""Moving actors: box tracks, the static/actor split, posing, rendering with the scene, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evolsplat_ns.data.actors import poses_at
from evolsplat_ns.data.pointcloud import make_generator
from evolsplat_ns.data.scene import SceneData
from evolsplat_ns.geometry import matrix_to_quat, quat_to_matrix
from evolsplat_ns.model.actors import ActorGaussians, ActorNodes, place_actors
from evolsplat_ns.model.render import rasterize
from tiny_run import lite_trainer


def _yaw(deg: float) -> torch.Tensor:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _pose(yaw_deg: float, xyz) -> torch.Tensor:
    T = torch.eye(4)
    T[:3, :3] = _yaw(yaw_deg)
    T[:3, 3] = torch.tensor(xyz, dtype=torch.float32)
    return T


def _one_actor(poses: list[torch.Tensor], valid: list[bool], n: int = 200) -> tuple[ActorNodes, ActorGaussians]:
    """A 1 m cube of ``n`` points (object frame) on a track over frames 0..F-1."""
    g = torch.Generator().manual_seed(0)
    means = torch.rand(n, 3, generator=g) - 0.5
    F = len(poses)
    nodes = ActorNodes(means=means, features_dc=torch.zeros(n, 3), scales=torch.full((n, 3), math.log(0.05)),
                       actor=torch.zeros(n, dtype=torch.long), frames=torch.arange(F),
                       poses=torch.stack(poses)[None], valid=torch.tensor(valid)[None], sizes=torch.ones(1, 3))
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1)
    gaussians = ActorGaussians(means, quats, torch.full((n, 3), 0.08), torch.full((n,), 0.95),
                               torch.ones(n, 1, 3), nodes.actor)
    return nodes, gaussians


@pytest.fixture(scope="module")
def scene(tiny_dataset) -> SceneData:
    return SceneData(tiny_dataset / "000")


def test_actor_points_lie_in_their_boxes_in_every_annotated_frame(scene):
    frames = list(range(12))
    pc = make_generator("lidar", voxel_size=0.0, outlier_removal="none", crop_radius=0.0).generate(scene, frames)
    assert pc.tracks and set(pc.tracks) == set(pc.dynamic)
    info = scene.instances()
    seg_from_world = torch.as_tensor(np.linalg.inv(scene.ego_to_world[frames[0]]), dtype=torch.float64)
    for inst, track in pc.tracks.items():
        ann = info[inst]["frame_annotations"]
        local = pc.dynamic[inst][0].double()
        size = torch.tensor(ann["box_size"][0], dtype=torch.float64)
        assert (local[:, 2] > -size[2] / 2 + 0.1 - 1e-6).all(), "no road points under the car (ground clearance)"
        assert track.valid.sum() == len(ann["frame_idx"])
        for t, obj_to_world in zip(ann["frame_idx"], ann["obj_to_world"]):
            box = seg_from_world @ torch.tensor(obj_to_world, dtype=torch.float64)
            torch.testing.assert_close(track.poses[frames.index(t)].double(), box, atol=1e-4, rtol=0)
            posed = local @ box[:3, :3].T + box[:3, 3]  # the actor placed at frame t ...
            back = (posed - box[:3, 3]) @ box[:3, :3]  # ... is inside that frame's box
            assert (back.abs() <= size / 2 + 0.1 + 1e-4).all()


def test_pose_interpolation_at_a_midpoint():
    frames = torch.tensor([0, 1, 2])
    poses = torch.stack([_pose(0, [0, 0, 0]), _pose(90, [2, 0, 0]), _pose(90, [4, 0, 0])])[None]
    valid = torch.tensor([[True, True, False]])
    out, ok = poses_at(frames, poses, valid, torch.tensor([0.5, 1.0, 1.5, 2.0, -1.0]))
    torch.testing.assert_close(out[0, 0, :3, 3], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out[0, 0, :3, :3], _yaw(45), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1, 0], poses[0, 1])
    assert ok[:, 0].tolist() == [True, True, False, False, False], "no box at frame 2: 1.5, 2 and -1 render nothing"


def test_rotations_compose_with_the_box():
    nodes, g = _one_actor([_pose(0, [0, 0, 0]), _pose(90, [0, 0, 0])], [True, True])
    g.quats = matrix_to_quat(_yaw(30)).repeat(len(nodes), 1)  # local orientation: 30 degrees of yaw
    at0, at1 = place_actors(g, nodes, 0.0), place_actors(g, nodes, 1.0)
    torch.testing.assert_close(quat_to_matrix(at0.quats[0]), _yaw(30), atol=1e-6, rtol=0)
    torch.testing.assert_close(quat_to_matrix(at1.quats[0]), _yaw(120), atol=1e-6, rtol=0)
    torch.testing.assert_close(at1.means, nodes.means @ _yaw(90).T, atol=1e-6, rtol=0)


def _render(params, c2w, K, W, H) -> torch.Tensor:
    viewmat = torch.linalg.inv(c2w)[None]
    return rasterize(params.means, params.quats, params.scales, params.opacities, params.sh, viewmat, K[None],
                     W, H, sh_degree=0, backend="reference").alpha[0, ..., 0]


def test_rendered_actor_follows_its_box_and_vanishes_without_one():
    """Camera 12 m behind, looking along +x (OpenCV: z forward): the car moves 2 m to the right."""
    W, H = 96, 64
    K = torch.tensor([[60.0, 0, W / 2], [0, 60.0, H / 2], [0, 0, 1]])
    c2w = torch.eye(4)
    c2w[:3, :3] = torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # OpenCV axes in the x-fwd, z-up frame
    c2w[:3, 3] = torch.tensor([-12.0, 0, 0])
    nodes, g = _one_actor([_pose(0, [0, 0, 0]), _pose(0, [0, -2, 0]), _pose(0, [0, -4, 0])], [True, True, False])
    for t in (0.0, 0.5, 1.0):
        alpha = _render(place_actors(g, nodes, t), c2w, K, W, H)
        ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
        cx = float((alpha * xs).sum() / alpha.sum())
        pose, _ = nodes.poses_at(t)
        centre = torch.linalg.inv(c2w) @ torch.cat([pose[0, :3, 3], torch.ones(1)])
        expected = float(K[0, 0] * centre[0] / centre[2] + K[0, 2])
        assert abs(cx - expected) < 1.5, (t, cx, expected)  # the projected centroid follows the box
    assert len(place_actors(g, nodes, 2.0)) == 0 and len(place_actors(g, nodes, 1.5)) == 0


def test_actors_without_a_box_are_dropped_by_cached_rows_per_frame():
    """Two actors, the second without a box at frame 1: its anchors leave the placed set there,
    from rows cached per frame (no mask on the device); a head-independent actor index is masked."""
    nodes, g = _one_actor([_pose(0, [0, 0, 0]), _pose(0, [1, 0, 0])], [True, True], n=10)
    nodes.actor = g.actor = torch.tensor([0, 1] * 5)
    nodes.poses = nodes.poses.repeat(2, 1, 1, 1)
    nodes.valid = torch.tensor([[True, True], [True, False]])
    assert nodes.anchors_at(0.0) is None, "every actor has a box at frame 0: nothing is dropped"
    rows = nodes.anchors_at(1.0)
    assert rows.tolist() == [0, 2, 4, 6, 8] and nodes.anchors_at(1.0) is rows, "cached per frame column"
    placed = place_actors(g, nodes, 1.0)
    torch.testing.assert_close(placed.means, g.means[rows] + torch.tensor([1.0, 0.0, 0.0]))
    assert nodes.anchors_at(0.5).tolist() == rows.tolist(), "interpolated: valid only where both frames are"
    other = ActorGaussians(g.means, g.quats, g.scales, g.opacities, g.sh, torch.tensor([1, 0] * 5))
    assert place_actors(other, nodes, 1.0).means.shape[0] == 5
    torch.testing.assert_close(place_actors(other, nodes, 1.0).means, g.means[1::2] + torch.tensor([1.0, 0, 0]))
    nodes.valid = torch.tensor([[True, True], [True, True]])  # new tracks: the cache follows them
    assert nodes.anchors_at(1.0) is None


def test_model_renders_actors_with_the_scene_and_checkpoints_carry_them(tiny_dataset, tmp_path):
    trainer = lite_trainer(tiny_dataset, tmp_path / "a")
    model = trainer.pipeline.model
    for s in range(2):
        trainer.train_step(s)
    key = model.context.key
    actors = model.segments.get(key).actors
    assert actors is not None and actors.num_actors >= 1, "the tiny scenes have moving cars"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictor.actor_head.parameters())

    state = model.encode(split_backward=False)
    src = model.context.sources
    t = float(src.frame_ids[0])
    with torch.no_grad():
        out = model.render(state, src.camtoworlds[0], src.intrinsics[0], src.width, src.height, time=t)
        static = model.render(state, src.camtoworlds[0], src.intrinsics[0], src.width, src.height, time=None)
    assert out["actors"] is not None and len(out["actors"]) > 0 and static["actors"] is None
    assert not torch.equal(out["rgb"], static["rgb"]), "actors are rasterised into the image"
    with torch.no_grad():  # no-grad renders at one time reuse the posed actors while the tracks stay
        again = model.predictor.predict_actors(state, t)
        assert again is out["actors"]
        poses = state.actor_nodes.poses.clone()
        poses[..., :3, 3] += 0.5
        state.actor_nodes = state.actor_nodes.with_poses(poses)
        moved = model.predictor.predict_actors(state, t)
    assert moved is not again and torch.allclose(moved.means, again.means + 0.5)
    with torch.enable_grad():
        assert model.predictor.predict_actors(state, t) is not moved, "training places per call"

    trainer.save_checkpoint(1)
    resumed = lite_trainer(tiny_dataset, tmp_path / "b", load_dir=trainer.checkpoint_dir)
    back = resumed.pipeline.model.segments.get(key).actors
    assert back.ids == actors.ids and len(back.ids) == actors.num_actors and back.origin == actors.origin == "box tracks"
    for name, tensor in actors.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(getattr(back, name).cpu(), tensor.cpu()), name
