"""Sensors of the synthetic ego vehicle and ray casting against the street.

- ``CameraRig``: Waymo-like pinhole cameras. Extrinsics are camera-to-vehicle in **Waymo camera
  axes** (x forward, y left, z up), as drivestudio writes them; the OpenCV camera-to-vehicle is
  ``extrinsic @ OPENCV2DATASET``. Rays are cast in the street frame.
- ``lidar_directions``: a spinning multi-beam LiDAR on the roof, all beams fired at the frame time
  (no rolling shutter).
- ``Raycaster``: a static scene built once plus a small per-frame scene of the moving cars; a
  ray's hit is the nearer of the two. Two backends give the same hits: open3d's Embree
  ``RaycastingScene`` (``"open3d"``, CPU) and a pure-torch BVH (``"torch"``, any device, see
  ``raycast_torch``); ``"auto"`` takes open3d when it imports, else torch (e.g. on a GPU machine
  without open3d).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evolsplat_ns.data.synth.config import RAYCASTER_CHOICES, SynthConfig
from evolsplat_ns.data.synth.mesh import TriMesh
from evolsplat_ns.data.synth.street import Street, yaw_matrix
from evolsplat_ns.geometry import OPENCV2DATASET, intrinsics_matrix

# Waymo-like camera mounts in the vehicle frame: (x, y, z) metres, yaw and downward pitch in
# degrees. Ids follow drivestudio: 0 FRONT, 1 FRONT_LEFT, 2 FRONT_RIGHT, 3 SIDE_LEFT, 4 SIDE_RIGHT.
CAMERA_MOUNTS = (
    ((1.55, 0.00, 2.10), 0.0, 2.0),
    ((1.50, 0.12, 2.10), 45.0, 2.0),
    ((1.50, -0.12, 2.10), -45.0, 2.0),
    ((1.30, 0.20, 2.08), 90.0, 3.0),
    ((1.30, -0.20, 2.08), -90.0, 3.0),
)
RING_RADIUS = 0.6                           # m, roof ring of the >= 6 camera rigs
RING_CENTRE = (0.9, 0.0, 2.10)              # vehicle frame, metres


def camera_mounts(num_cameras: int) -> list[tuple[tuple[float, float, float], float, float]]:
    """Mounts ((x, y, z), yaw, pitch) of a rig of ``num_cameras`` cameras (vehicle frame, degrees).

    1 to 5 cameras: Waymo's first ``num_cameras`` (``CAMERA_MOUNTS``). 6 or more: a ring of evenly
    spaced yaws, ``360 / N`` apart, numbered front first then alternating left (+yaw) and right:
    camera ``k`` looks at yaw ``+-ceil(k / 2) * 360 / N`` (left for odd k); with an even N the last
    camera looks straight back (yaw 180). Each sits on a roof circle of radius ``RING_RADIUS``
    around ``RING_CENTRE``, facing outwards, pitched 2 degrees down.
    """
    if num_cameras <= len(CAMERA_MOUNTS):
        return list(CAMERA_MOUNTS[:num_cameras])
    step = 360.0 / num_cameras
    mounts = []
    for k in range(num_cameras):
        yaw = np.ceil(k / 2) * step * (1 if k % 2 else -1)
        yaw = 180.0 if abs(abs(yaw) - 180.0) < 1e-9 else yaw
        a = np.radians(yaw)
        pos = (RING_CENTRE[0] + RING_RADIUS * np.cos(a), RING_CENTRE[1] + RING_RADIUS * np.sin(a), RING_CENTRE[2])
        mounts.append((pos, float(yaw), 2.0))
    return mounts


def camera_name(yaw_deg: float) -> str:
    """A compass-style name for a ring camera's yaw (0 FRONT, +90 LEFT, 180 REAR, -90 RIGHT)."""
    yaw = (yaw_deg + 180.0) % 360.0 - 180.0
    if abs(yaw) < 1e-6:
        return "FRONT"
    if abs(abs(yaw) - 180.0) < 1e-6:
        return "REAR"
    side = "LEFT" if yaw > 0 else "RIGHT"
    return f"{side}_{abs(yaw):.0f}"


LIDAR_MOUNT = np.array([1.20, 0.0, 2.20])   # vehicle frame, on the roof
LIDAR_ELEVATION_DEG = (2.0, -20.0)          # top and bottom beam (Waymo TOP: +2.4 to -17.6)
TOP_LIDAR_ID = 0                            # drivestudio's laser id of Waymo's TOP LiDAR


def _pitch_matrix(pitch: float) -> np.ndarray:
    """Rotation [4, 4] about +y (Waymo axes): positive pitch tilts +x towards -z (looks down)."""
    c, s = np.cos(pitch), np.sin(pitch)
    T = np.eye(4)
    T[[0, 0, 2, 2], [0, 2, 0, 2]] = [c, s, -s, c]
    return T


@dataclass
class CameraRig:
    """C pinhole cameras of identical image size.

    Attributes:
        K: [C, 3, 3] intrinsics in pixels (OpenCV: pixel (i, j) spans [i, i+1] x [j, j+1]).
        extrinsics: [C, 4, 4] camera-to-vehicle, Waymo camera axes (x fwd, y left, z up).
        width, height: image size in pixels.
    """

    K: np.ndarray
    extrinsics: np.ndarray
    width: int
    height: int

    @property
    def num_cameras(self) -> int:
        return len(self.K)

    @property
    def cam_to_vehicle(self) -> np.ndarray:
        """[C, 4, 4] OpenCV camera (x right, y down, z forward) -> vehicle frame."""
        return self.extrinsics @ OPENCV2DATASET

    def intrinsics_row(self, cam: int) -> np.ndarray:
        """drivestudio's 9 intrinsics numbers ``fu fv cu cv k1 k2 p1 p2 k3`` (no distortion)."""
        K = self.K[cam]
        return np.array([K[0, 0], K[1, 1], K[0, 2], K[1, 2], 0, 0, 0, 0, 0], np.float64)

    def rays(self, vehicle_to_street: np.ndarray) -> np.ndarray:
        """Rays [C, H, W, 6] (origin, direction) through every pixel centre, street frame.

        Directions are scaled so that their OpenCV camera z is 1: a hit distance ``t`` is then
        the pixel's OpenCV z-depth in metres.
        """
        u, v = np.meshgrid(np.arange(self.width) + 0.5, np.arange(self.height) + 0.5)
        pix = np.stack([u, v, np.ones_like(u)], -1).reshape(1, -1, 3)          # [1, H*W, 3]
        c2s = vehicle_to_street @ self.cam_to_vehicle                          # [C, 4, 4] OpenCV
        pix_to_dir = c2s[:, :3, :3] @ np.linalg.inv(self.K)                    # camera z = 1
        d = pix @ pix_to_dir.transpose(0, 2, 1)                                # [C, H*W, 3]
        o = np.broadcast_to(c2s[:, None, :3, 3], d.shape)
        rays = np.concatenate([o, d], -1).astype(np.float32)
        return rays.reshape(self.num_cameras, self.height, self.width, 6)

    def project(self, points: np.ndarray, vehicle_to_street: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Project homogeneous street-frame points [C, N, 4] into each camera.

        ``w = 1`` rows are points, ``w = 0`` rows are directions (points at infinity, e.g. sky).

        Returns:
            uv: [C, N, 2] continuous pixel coordinates (x right, y down); depth: [C, N] z (metres,
            or the direction's z component for ``w = 0``).
        """
        s2c = np.linalg.inv(vehicle_to_street @ self.cam_to_vehicle)      # [C, 4, 4]
        P = self.K @ s2c[:, :3, :]                                        # [C, 3, 4]
        pix = points @ P.transpose(0, 2, 1)
        depth = pix[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = pix[..., :2] / depth[..., None]
        return uv, depth


def make_rig(cfg: SynthConfig) -> CameraRig:
    """``cfg.cameras`` cameras placed by :func:`camera_mounts`, square pixels, principal point at the centre."""
    f = (cfg.width / 2) / np.tan(np.radians(cfg.hfov_deg) / 2)
    K = intrinsics_matrix(f, f, cfg.width / 2, cfg.height / 2)
    ext = [yaw_matrix(np.radians(yaw), pos) @ _pitch_matrix(np.radians(pitch))
           for pos, yaw, pitch in camera_mounts(cfg.cameras)]
    return CameraRig(np.stack([K] * cfg.cameras), np.stack(ext), cfg.width, cfg.height)


def lidar_directions(cfg: SynthConfig) -> np.ndarray:
    """Unit ray directions [B * A, 3] of one sweep in the vehicle frame, beam-major.

    Beam 0 is the top beam; azimuth runs counter-clockwise from +x (forward).
    """
    elev = np.radians(np.linspace(*LIDAR_ELEVATION_DEG, cfg.lidar_beams))
    azim = np.linspace(0, 2 * np.pi, cfg.lidar_azimuths, endpoint=False)
    e, a = np.meshgrid(elev, azim, indexing="ij")
    return np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], -1).reshape(-1, 3)


@dataclass
class Hits:
    """First hits of N rays; per-hit arrays cover only the M rays that hit (``index``).

    Attributes:
        t: [N] hit distance in units of the ray direction's length, inf = no hit.
        index: [M] rays that hit.
        point: [M, 3] street-frame hit position.
        normal: [M, 3] street-frame unit normal, turned to face the ray's origin.
        material, colour, params, car: per-hit copies of the hit triangle's ``TriMesh`` attributes.
    """

    t: np.ndarray
    index: np.ndarray
    point: np.ndarray
    normal: np.ndarray
    material: np.ndarray
    colour: np.ndarray
    params: np.ndarray
    car: np.ndarray

    def select(self, keep: np.ndarray) -> "Hits":
        """The hits where ``keep`` [M] is True (``t`` still covers every ray)."""
        return Hits(self.t, self.index[keep], self.point[keep], self.normal[keep], self.material[keep],
                    self.colour[keep], self.params[keep], self.car[keep])


RAYCASTERS = RAYCASTER_CHOICES


def open3d_available() -> bool:
    """Whether ``import open3d`` works here (False where it is absent or blocked)."""
    try:
        import open3d  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_raycaster(name: str) -> str:
    """The backend ``"open3d"`` or ``"torch"`` that setting ``name`` (one of ``RAYCASTERS``) means here."""
    if name not in RAYCASTERS:
        raise ValueError(f"--raycaster {name!r} is unknown: use one of {', '.join(RAYCASTERS)}")
    if name == "auto":
        return "open3d" if open3d_available() else "torch"
    if name == "open3d" and not open3d_available():
        raise ValueError("--raycaster open3d: open3d does not import here; install it "
                         "(pip install open3d) or use --raycaster torch (or auto)")
    return name


def describe_raycaster(raycaster: str, device: str = "auto") -> str:
    """What settings ``raycaster`` / ``device`` resolve to here, e.g. ``"torch on cuda"``.

    Raises ``ValueError`` (naming the flag) when the backend or device is not available.
    """
    backend = resolve_raycaster(raycaster)
    if backend == "open3d":
        return "open3d"
    from evolsplat_ns.data.synth.raycast_torch import resolve_device

    return f"torch on {resolve_device(device)}"


class _Open3dMesh:
    """open3d's Embree ``RaycastingScene`` over one mesh, with ``TorchMesh``'s interface."""

    def __init__(self, mesh: TriMesh):
        import open3d as o3d

        self._o3d = o3d
        self.scene = o3d.t.geometry.RaycastingScene()
        self.scene.add_triangles(o3d.core.Tensor(mesh.vertices), o3d.core.Tensor(mesh.triangles.astype(np.uint32)))

    def cast_rays(self, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``t`` [N] (inf = miss), triangle [N] int64 (-1 = miss), unit normal [N, 3] of ``rays`` [N, 6]."""
        out = self.scene.cast_rays(self._o3d.core.Tensor(np.ascontiguousarray(rays, np.float32)))
        t = out["t_hit"].numpy()
        prim = np.where(np.isfinite(t), out["primitive_ids"].numpy().astype(np.int64), -1)
        return t, prim, out["primitive_normals"].numpy()

    def test_occlusions(self, rays: np.ndarray) -> np.ndarray:
        """[N] bool: any triangle at t >= 0 along ``rays`` [N, 6]."""
        hit = self.scene.test_occlusions(self._o3d.core.Tensor(np.ascontiguousarray(rays, np.float32)))
        return hit.numpy().astype(bool)


def mesh_caster(mesh: TriMesh, backend: str, device: str = "auto"):
    """A ray caster over ``mesh`` for a resolved ``backend`` ("open3d" or "torch", see ``resolve_raycaster``).

    Both answer ``cast_rays(rays [N, 6]) -> (t, triangle, normal)`` and ``test_occlusions(rays)``;
    ``device`` ("auto", "cpu", "cuda", "cuda:N") matters to the torch backend only.
    """
    if backend == "open3d":
        return _Open3dMesh(mesh)
    if backend == "torch":
        from evolsplat_ns.data.synth.raycast_torch import TorchMesh, resolve_device

        return TorchMesh(mesh.vertices, mesh.triangles, resolve_device(device))
    raise ValueError(f"mesh_caster backend {backend!r} must be 'open3d' or 'torch' (resolve 'auto' first)")


class Raycaster:
    """Ray casting against a street at one time: static scene (built once) + moving cars.

    Args:
        street: the street to cast against.
        raycaster: backend setting, one of ``RAYCASTERS`` (``"auto"``: open3d if importable, else torch).
        device: torch device of the torch backend (``"auto"``: CUDA when available).
    """

    def __init__(self, street: Street, raycaster: str = "auto", device: str = "auto"):
        self.street = street
        self.backend = resolve_raycaster(raycaster)
        self.device = device
        self._static_scene = self._scene(street.static)
        self._moving_scene = None
        # Triangle attributes of the static mesh followed by those of the moving cars.
        self._triangles = street.static

    def _scene(self, mesh: TriMesh):
        return mesh_caster(mesh, self.backend, self.device)

    def set_time(self, time: float) -> None:
        """Move the moving cars to ``time`` seconds (rebuilds the small dynamic scene)."""
        moving = self.street.moving_mesh(time)
        self._moving_scene = self._scene(moving) if moving.num_triangles else None
        self._triangles = TriMesh.concat([self.street.static, moving])

    def cast(self, rays: np.ndarray) -> Hits:
        """First hits of ``rays`` [N, 6] (street frame, float32) with static and moving geometry."""
        t, tri, normal = self._cast_one(self._static_scene, rays)
        if self._moving_scene is not None:
            t_m, tri_m, normal_m = self._cast_one(self._moving_scene, rays)
            nearer = t_m < t
            t = np.where(nearer, t_m, t)
            tri = np.where(nearer, tri_m + self.street.static.num_triangles, tri)
            normal = np.where(nearer[:, None], normal_m, normal)
        index = np.flatnonzero(np.isfinite(t))
        tri, d = tri[index], rays[index, 3:]
        normal = normal[index]
        normal = np.where((np.sum(normal * d, 1) > 0)[:, None], -normal, normal)
        m = self._triangles
        point = rays[index, :3] + t[index, None] * d
        return Hits(t, index, point, normal, m.material[tri], m.colour[tri], m.params[tri], m.car[tri])

    @staticmethod
    def _cast_one(scene, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return scene.cast_rays(rays)

    def occluded_static(self, rays: np.ndarray) -> np.ndarray:
        """[N] bool: does static geometry block ``rays`` [N, 6] (shadow rays; moving cars cast none)."""
        if not len(rays):
            return np.zeros(0, bool)
        return self._static_scene.test_occlusions(rays)
