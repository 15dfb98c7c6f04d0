"""Triangle soups with per-triangle surface attributes, and the primitives streets are made of.

Primitives come from open3d's legacy ``TriangleMesh.create_*`` (imported lazily so this module
loads where open3d is absent). Every ``TriMesh`` carries, per triangle, what shading needs:
a material id, an RGB base colour, four material parameters and the car index it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TriMesh:
    """Triangles with per-triangle attributes, in one frame (street frame or a car's local frame).

    Attributes:
        vertices: [V, 3] float32 positions in metres.
        triangles: [T, 3] int32 vertex indices (outward-facing winding).
        material: [T] int16 ``Material`` id.
        colour: [T, 3] float32 base albedo in [0, 1].
        params: [T, 4] float32 material parameters (meaning per material, see ``textures``).
        car: [T] int32 index into ``Street.cars``, -1 for triangles not on a car.
    """

    vertices: np.ndarray
    triangles: np.ndarray
    material: np.ndarray
    colour: np.ndarray
    params: np.ndarray
    car: np.ndarray

    @property
    def num_triangles(self) -> int:
        return len(self.triangles)

    def transformed(self, T: np.ndarray) -> "TriMesh":
        """Copy with vertices mapped by the rigid transform ``T`` [4, 4]."""
        v = self.vertices @ T[:3, :3].T.astype(np.float32) + T[:3, 3].astype(np.float32)
        return TriMesh(v, self.triangles, self.material, self.colour, self.params, self.car)

    @staticmethod
    def concat(meshes: list["TriMesh"]) -> "TriMesh":
        """One mesh holding all of ``meshes`` (triangle order preserved, indices re-based)."""
        if not meshes:
            return TriMesh.empty()
        offsets = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
        return TriMesh(
            vertices=np.concatenate([m.vertices for m in meshes]).astype(np.float32),
            triangles=np.concatenate([m.triangles + o for m, o in zip(meshes, offsets)]).astype(np.int32),
            material=np.concatenate([m.material for m in meshes]),
            colour=np.concatenate([m.colour for m in meshes]),
            params=np.concatenate([m.params for m in meshes]),
            car=np.concatenate([m.car for m in meshes]),
        )

    @staticmethod
    def empty() -> "TriMesh":
        return TriMesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), np.zeros(0, np.int16),
                       np.zeros((0, 3), np.float32), np.zeros((0, 4), np.float32), np.zeros(0, np.int32))


def surface(vertices: np.ndarray, triangles: np.ndarray, material: int, colour, params=(0, 0, 0, 0),
            car: int = -1) -> TriMesh:
    """Wrap geometry [V, 3] / [T, 3] as a ``TriMesh`` whose triangles share one set of attributes."""
    n = len(triangles)
    return TriMesh(
        vertices=np.asarray(vertices, np.float32),
        triangles=np.asarray(triangles, np.int32),
        material=np.full(n, material, np.int16),
        colour=np.tile(np.asarray(colour, np.float32), (n, 1)),
        params=np.tile(np.asarray(params, np.float32), (n, 1)),
        car=np.full(n, car, np.int32),
    )


def _arrays(mesh) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(mesh.vertices, np.float32), np.asarray(mesh.triangles, np.int32)


def box(lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned box from corner ``lo`` [3] to ``hi`` [3]: vertices [8, 3], triangles [12, 3]."""
    import open3d as o3d

    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    w, h, d = hi - lo
    v, f = _arrays(o3d.geometry.TriangleMesh.create_box(w, h, d))
    return v + lo.astype(np.float32), f


def cylinder(radius: float, height: float, centre, axis: str = "z",
             resolution: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Closed cylinder of ``height`` along ``axis`` ("y" or "z") centred at ``centre`` [3]."""
    import open3d as o3d

    v, f = _arrays(o3d.geometry.TriangleMesh.create_cylinder(radius, height, resolution, split=1))
    if axis == "y":
        v = v[:, [0, 2, 1]]  # swapping two axes mirrors the mesh, so flip the winding back
        f = f[:, [0, 2, 1]]
    elif axis != "z":
        raise ValueError(f"cylinder axis must be 'y' or 'z', got {axis!r}")
    return v + np.asarray(centre, np.float32), f


def sphere(radius: float, centre, resolution: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """UV sphere of ``radius`` centred at ``centre`` [3]."""
    import open3d as o3d

    v, f = _arrays(o3d.geometry.TriangleMesh.create_sphere(radius, resolution))
    return v + np.asarray(centre, np.float32), f
