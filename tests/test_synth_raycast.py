"""The synthetic street generator without open3d: numpy primitives and the pure-torch ray caster.

- the primitives equal open3d's ``TriangleMesh.create_*`` exactly (where open3d is installed);
- the torch BVH caster agrees with a brute-force float64 ray-triangle test on random soups and
  with open3d's Embree ``RaycastingScene`` on a street (hits, distances, triangles, normals,
  occlusion);
- a whole tiny scene generated in a subprocess with open3d made unimportable matches the scene
  generated with open3d (images, depth, masks, flow, LiDAR, boxes), the default point-cloud
  generators load it there too, and the CLI refuses what is not there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evolsplat_ns.data.synth import SynthConfig
from evolsplat_ns.data.synth.mesh import create_box, create_cylinder, create_sphere
from evolsplat_ns.data.synth.raycast_torch import TorchMesh
from evolsplat_ns.data.synth.sensors import lidar_directions, make_rig, mesh_caster
from evolsplat_ns.data.synth.street import build_street

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(scenes=1, frames=2, cameras=2, width=64, height=48, lidar_beams=16, lidar_azimuths=180,
            moving_cars=2, seed=5)


def _has_open3d() -> bool:
    try:
        import open3d  # noqa: F401
    except ImportError:
        return False
    return True


needs_open3d = pytest.mark.skipif(not _has_open3d(), reason="compares against open3d")


# ----------------------------------------------------------------------------- primitives


@needs_open3d
def test_primitives_equal_open3d_bit_for_bit():
    import open3d as o3d

    rng = np.random.default_rng(0)
    make = o3d.geometry.TriangleMesh
    for _ in range(40):
        w, h, d = rng.uniform(0.01, 40, 3)
        r, res = rng.uniform(0.05, 3), int(rng.integers(3, 16))
        for (v, f), ref in [(create_box(w, h, d), make.create_box(w, h, d)),
                            (create_cylinder(r, h, res), make.create_cylinder(r, h, res, split=1)),
                            (create_sphere(r, res), make.create_sphere(r, res))]:
            np.testing.assert_array_equal(f, np.asarray(ref.triangles))
            np.testing.assert_array_equal(v, np.asarray(ref.vertices))


def test_primitives_are_closed_and_outward_wound():
    """Every edge is shared by exactly two triangles in opposite directions, normals point outwards."""
    for v, f in [create_box(1, 2, 3), create_cylinder(0.5, 2.0, 7), create_sphere(1.5, 6)]:
        edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        directed = {tuple(e) for e in edges}
        assert len(directed) == len(edges) and all((b, a) in directed for a, b in directed)
        c = v[f]
        n = np.cross(c[:, 1] - c[:, 0], c[:, 2] - c[:, 0])
        outward = np.sum(n * (c.mean(1) - v.mean(0)), 1)
        assert np.all(outward > 0)


# ----------------------------------------------------------------------------- torch caster alone


def _brute_force(vertices: np.ndarray, triangles: np.ndarray, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 Möller–Trumbore of every ray against every triangle: nearest t [N] and triangle [N]."""
    c = vertices[triangles].astype(np.float64)
    v0, e1, e2 = c[:, 0], c[:, 1] - c[:, 0], c[:, 2] - c[:, 0]
    o, d = rays[:, None, :3].astype(np.float64), rays[:, None, 3:].astype(np.float64)
    p = np.cross(d, e2)
    det = np.sum(e1 * p, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = o - v0
        u = np.sum(s * p, -1) / det
        q = np.cross(s, e1)
        v = np.sum(d * q, -1) / det
        t = np.sum(e2 * q, -1) / det
    t = np.where((u >= 0) & (v >= 0) & (u + v <= 1) & (t >= 0) & (det != 0), t, np.inf)
    k = np.argmin(t, 1)
    t_min = t[np.arange(len(rays)), k]
    return t_min, np.where(np.isfinite(t_min), k, -1)


def test_single_triangle_hit_miss_and_conventions():
    v = np.array([[0, 0, 0], [2, 0, 0], [0, 2, 0]], np.float32)
    mesh = TorchMesh(v, np.array([[0, 1, 2]]))
    rays = np.array([
        [0.5, 0.5, 1, 0, 0, -1],     # from above: t = 1
        [0.5, 0.5, -1, 0, 0, 2],     # from below (two-sided), unnormalised direction: t = 0.5
        [0.5, 0.5, 1, 0, 0, 1],      # pointing away: miss
        [3.0, 3.0, 1, 0, 0, -1],     # beside the triangle: miss
        [0.5, 0.5, 0, 0, 0, -1],     # origin on the triangle: t = 0 counts, as in Embree
    ], np.float32)
    t, k, n = mesh.cast_rays(rays)
    np.testing.assert_allclose(t, [1, 0.5, np.inf, np.inf, 0], atol=1e-6)
    np.testing.assert_array_equal(k, [0, 0, -1, -1, 0])
    np.testing.assert_allclose(n, [[0, 0, 1], [0, 0, 1], [0, 0, 0], [0, 0, 0], [0, 0, 1]], atol=1e-7)
    np.testing.assert_array_equal(mesh.test_occlusions(rays), [True, True, False, False, True])
    empty = TorchMesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64))
    t, k, _ = empty.cast_rays(rays)
    assert np.all(np.isinf(t)) and np.all(k == -1) and not empty.test_occlusions(rays).any()


@pytest.mark.parametrize("leaf_size,branching", [(8, 8), (3, 2), (16, 4)])
def test_bvh_matches_brute_force_on_a_random_soup(leaf_size, branching):
    """Small triangles scattered in a box plus two big ground triangles (the brute-force set)."""
    rng = np.random.default_rng(leaf_size)
    n = 700
    centres = rng.uniform([-20, -20, 0], [20, 20, 10], (n, 1, 3))
    small = centres + rng.normal(0, 0.8, (n, 3, 3))
    ground = np.array([[[-500, -500, 0], [500, -500, 0], [500, 500, 0]],
                       [[-500, -500, 0], [500, 500, 0], [-500, 500, 0]]])
    soup = np.concatenate([small, ground]).astype(np.float32)
    vertices, triangles = soup.reshape(-1, 3), np.arange(len(soup) * 3).reshape(-1, 3)
    origins = rng.uniform([-25, -25, 1], [25, 25, 15], (3000, 3))
    rays = np.concatenate([origins, rng.normal(0, 1, (3000, 3))], 1).astype(np.float32)
    mesh = TorchMesh(vertices, triangles, leaf_size=leaf_size, branching=branching, ray_chunk=1024,
                     pair_chunk=4096)
    assert mesh._big.pad == 2  # the ground went to the brute-force set
    t, k, _ = mesh.cast_rays(rays)
    t_ref, k_ref = _brute_force(vertices, triangles, rays)
    assert np.array_equal(np.isfinite(t), np.isfinite(t_ref))
    hit = np.isfinite(t_ref)
    assert 0.3 < hit.mean() < 0.95
    np.testing.assert_allclose(t[hit], t_ref[hit], rtol=1e-4, atol=1e-5)
    assert np.mean(k != k_ref) < 0.005
    occluded = mesh.test_occlusions(rays)
    np.testing.assert_array_equal(occluded, hit)
    away = np.tile(np.array([[0, 0, 1000, 0.1, 0, 1]], np.float32), (5, 1))  # no box is entered at all
    assert np.all(np.isinf(mesh.cast_rays(away)[0])) and not mesh.test_occlusions(away).any()
    assert len(mesh.cast_rays(away[:0])[0]) == 0 and len(mesh.test_occlusions(away[:0])) == 0


# ----------------------------------------------------------------------------- against open3d


@pytest.fixture(scope="module")
def street():
    return build_street(SynthConfig(**TINY), np.random.default_rng(TINY["seed"]))


def _street_rays(street) -> np.ndarray:
    cfg = SynthConfig(**TINY)
    cams = make_rig(cfg).rays(street.ego.pose(0.1)).reshape(-1, 6)
    v2s = street.ego.pose(0.1)
    d = lidar_directions(cfg) @ v2s[:3, :3].T
    lidar = np.concatenate([np.broadcast_to(v2s[:3, 3] + [0, 0, 2.2], d.shape), d], 1)
    return np.concatenate([cams, lidar]).astype(np.float32)


@needs_open3d
def test_torch_caster_matches_open3d_on_a_street(street):
    rays = _street_rays(street)
    ref = mesh_caster(street.static, "open3d")
    ours = mesh_caster(street.static, "torch", "cpu")
    t_ref, k_ref, n_ref = ref.cast_rays(rays)
    t, k, n = ours.cast_rays(rays)
    hit = np.isfinite(t_ref)
    assert np.array_equal(np.isfinite(t), hit) and 0.5 < hit.mean() < 1
    np.testing.assert_allclose(t[hit], t_ref[hit], rtol=1e-4)
    assert np.mean(k != k_ref) < 0.005
    same = (k == k_ref) & hit
    np.testing.assert_allclose(n[same], n_ref[same], atol=1e-4)  # float32 edges of 600 m triangles
    assert np.all(n[~hit] == 0)
    # Shadow rays from the hit points towards the sun, as render.shade casts them.
    origins = rays[hit, :3] + t_ref[hit, None] * rays[hit, 3:] + 0.02 * n_ref[hit]
    shadow = np.concatenate([origins, np.broadcast_to(street.sun, origins.shape)], 1).astype(np.float32)
    occ_ref, occ = ref.test_occlusions(shadow), ours.test_occlusions(shadow)
    assert 0.02 < occ_ref.mean() < 0.98
    assert np.mean(occ != occ_ref) < 0.001


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_caster_on_cuda_matches_cpu(street):
    rays = _street_rays(street)
    t_cpu, k_cpu, _ = mesh_caster(street.static, "torch", "cpu").cast_rays(rays)
    t_gpu, k_gpu, _ = mesh_caster(street.static, "torch", "cuda").cast_rays(rays)
    hit = np.isfinite(t_cpu)
    assert np.array_equal(np.isfinite(t_gpu), hit)
    np.testing.assert_allclose(t_gpu[hit], t_cpu[hit], rtol=1e-5)
    assert np.mean(k_gpu != k_cpu) < 0.001


# ----------------------------------------------------------------------------- whole scene, open3d blocked

_BLOCKED = """
import json, sys
sys.modules["open3d"] = None  # `import open3d` now raises ImportError, as on the GPU machine
import torch
torch.set_num_threads(1)
from evolsplat_ns.cli.synth import entrypoint
from evolsplat_ns.data.synth.sensors import resolve_raycaster
report = {"auto": resolve_raycaster("auto")}
try:
    resolve_raycaster("open3d")
except ValueError as e:
    report["open3d_error"] = str(e)
entrypoint(sys.argv[1:])
# Training-side loading of the new scene with the default point-cloud settings needs no open3d either.
from evolsplat_ns.data.pointcloud import make_generator
from evolsplat_ns.data.scene import SceneData
scene = SceneData(sys.argv[sys.argv.index("--out") + 1] + "/000")
report["points"] = {g: len(make_generator(g).generate(scene, [0, 1]).points) for g in ("lidar", "depth", "hybrid")}
report["open3d_imported"] = any(m == "open3d" or m.startswith("open3d.") for m, v in sys.modules.items()
                                if v is not None)
print("REPORT" + json.dumps(report))
"""


def _flags(cfg: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]


def _run_blocked(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", _BLOCKED, "--out", str(out), *_flags(TINY), *extra],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def blocked_scene(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth_torch")
    proc = _run_blocked(out, "--device=cpu", "--box-noise-trans=0.2", "--box-noise-rot=2")
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT"))
    assert "ray casting: torch on cpu" in proc.stdout
    return out / "000", json.loads(line[len("REPORT"):])


def test_generation_without_open3d(blocked_scene):
    from evolsplat_ns.data import layout

    root, report = blocked_scene
    assert report["auto"] == "torch" and not report["open3d_imported"]
    assert "--raycaster torch" in report["open3d_error"]
    assert all(n > 100 for n in report["points"].values()), report["points"]
    L = layout.SceneLayout.scan(root)
    assert L.frames == [0, 1] and L.cameras == [0, 1]
    for t in L.frames:
        assert len(layout.read_lidar(L.lidar_path(t))) > 500
        for c in L.cameras:
            depth = np.load(L.depth_path(t, c))
            assert depth.shape == (48, 64) and (depth > 0).mean() > 0.3
    assert L.true_instances_info_path.exists()  # box noise: instances_gt/ written too


@needs_open3d
def test_scene_without_open3d_matches_scene_with_open3d(blocked_scene, tmp_path):
    import cv2

    from evolsplat_ns.data import layout
    from evolsplat_ns.data.synth import generate_dataset

    root, _ = blocked_scene
    ref_root = generate_dataset(SynthConfig(**TINY, raycaster="open3d", box_noise_trans=0.2, box_noise_rot=2),
                                tmp_path)[0]
    A, B = layout.SceneLayout.scan(ref_root), layout.SceneLayout.scan(root)
    for t in A.frames:
        ref_lidar, lidar = layout.read_lidar(A.lidar_path(t)), layout.read_lidar(B.lidar_path(t))
        assert abs(len(ref_lidar) - len(lidar)) <= 0.002 * len(ref_lidar) + 1
        if len(ref_lidar) == len(lidar):
            np.testing.assert_allclose(lidar[:, 3:6], ref_lidar[:, 3:6], atol=1e-3)
        for c in A.cameras:
            img_a = cv2.imread(str(A.image_path(t, c))).astype(np.float64)
            img_b = cv2.imread(str(B.image_path(t, c))).astype(np.float64)
            assert np.abs(img_a - img_b).mean() < 1.0  # grey levels: < 1/255 of the range
            da, db = np.load(A.depth_path(t, c)), np.load(B.depth_path(t, c))
            assert np.mean((da > 0) != (db > 0)) < 0.002
            both = (da > 0) & (db > 0)
            assert np.mean(np.abs(da[both] - db[both]) > 1e-4 * da[both]) < 0.005
            for path in (A.sky_mask_path(t, c), A.dynamic_mask_path(t, c, "all"), A.instance_mask_path(t, c)):
                other = B.root / path.relative_to(A.root)
                assert np.mean(cv2.imread(str(path), -1) != cv2.imread(str(other), -1)) < 0.002
            fa, fb = np.load(A.flow_path(t, c)).astype(np.float64), np.load(B.flow_path(t, c)).astype(np.float64)
            assert np.mean(np.abs(fa - fb) > 0.05) < 0.005
    for name in ("instances_info_path", "frame_instances_path", "true_instances_info_path"):
        assert getattr(A, name).read_text() == getattr(B, name).read_text()


def test_cli_refuses_what_is_not_there(tmp_path, monkeypatch, capsys):
    from evolsplat_ns.cli.synth import entrypoint

    monkeypatch.setitem(sys.modules, "open3d", None)  # import open3d fails from here on
    with pytest.raises(SystemExit) as e:
        entrypoint(["--out", str(tmp_path / "a"), "--raycaster", "open3d"])
    assert "--raycaster open3d: open3d does not import here" in str(e.value.code)
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit):
        entrypoint(["--out", str(tmp_path / "a"), "--raycaster", "embree"])
    assert "invalid choice: 'embree'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            entrypoint(["--out", str(tmp_path / "b"), "--device", "cuda"])
        assert "CUDA is not available" in str(e.value.code)
    with pytest.raises(ValueError, match="SynthConfig.raycaster"):
        SynthConfig(raycaster="embree")
    with pytest.raises(ValueError, match="SynthConfig.device"):
        SynthConfig(device="gpu0")


def test_first_scene_writes_the_same_scene_as_a_full_run(tmp_path):
    """Scene i depends only on seed + i: a process writing ``--first-scene 1`` produces the folder a
    two-scene run writes as 001, so a dataset can be generated by several processes into one OUT."""
    from evolsplat_ns.data.synth import generate_dataset

    small = {**TINY, "frames": 1, "cameras": 1, "raycaster": "torch", "device": "cpu"}
    full = generate_dataset(SynthConfig(**{**small, "scenes": 2}), tmp_path / "full")
    part = generate_dataset(SynthConfig(**{**small, "scenes": 1, "first_scene": 1}), tmp_path / "part")
    assert [p.name for p in part] == ["001"] and full[1].name == "001"
    assert not (tmp_path / "part" / "000").exists()
    a, b = full[1], part[0]
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    with pytest.raises(ValueError, match="first_scene"):
        SynthConfig(scenes=2, first_scene=999)
