"""Triangle soups with per-triangle surface attributes, and the primitives streets are made of.

Primitives (box, cylinder, sphere) are numpy re-implementations of open3d's legacy
``TriangleMesh.create_*`` with the identical vertex and triangle layout: open3d is not needed.
Every ``TriMesh`` carries, per triangle, what shading needs: a material id, an RGB base colour,
four material parameters and the car index it belongs to.
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


# The primitives below reproduce open3d's legacy ``TriangleMesh.create_box`` / ``create_cylinder``
# (split=1) / ``create_sphere`` vertex for vertex and triangle for triangle (same order, same
# float64 formulas, then float32), so scenes do not depend on whether open3d is installed;
# tests/test_synth_raycast.py checks the match against open3d where it is present.

_BOX_TRIANGLES = np.array([[4, 7, 5], [4, 6, 7], [0, 2, 4], [2, 6, 4], [0, 1, 2], [1, 3, 2],
                           [1, 5, 7], [1, 7, 3], [2, 3, 7], [2, 7, 6], [0, 4, 1], [1, 4, 5]], np.int32)


def create_box(width: float, height: float, depth: float) -> tuple[np.ndarray, np.ndarray]:
    """open3d's ``create_box``: corner at the origin, extents ``width`` (x), ``height`` (y), ``depth`` (z).

    Vertex ``i`` sits at (x, y, z) = (bit 0, bit 2, bit 1 of i) times the extents; [8, 3] float64
    vertices and [12, 3] int32 outward-wound triangles.
    """
    i = np.arange(8)
    v = np.stack([(i & 1) * float(width), (i >> 2 & 1) * float(height), (i >> 1 & 1) * float(depth)], 1)
    return v.astype(np.float64), _BOX_TRIANGLES.copy()


def _ring_triangles(first: int, rings: int, n: int) -> list[list[int]]:
    """Two triangles per quad between consecutive rings of ``n`` vertices starting at ``first``."""
    tris = []
    for i in range(rings - 1):
        base1, base2 = first + n * i, first + n * (i + 1)
        for j in range(n):
            j1 = (j + 1) % n
            tris += [[base2 + j, base1 + j1, base1 + j], [base2 + j, base2 + j1, base1 + j1]]
    return tris


def _cap_triangles(first: int, last_ring: int, n: int) -> list[list[int]]:
    """Fans to the top pole (vertex 0, first ring) and bottom pole (vertex 1, last ring), interleaved."""
    tris = []
    for j in range(n):
        j1 = (j + 1) % n
        tris += [[0, first + j, first + j1], [1, last_ring + j1, last_ring + j]]
    return tris


def create_cylinder(radius: float, height: float, resolution: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """open3d's ``create_cylinder(radius, height, resolution, split=1)``: axis z, centred at the origin.

    Vertices [2 + 2 * resolution, 3]: top centre, bottom centre, top ring, bottom ring (ring vertex
    j at angle 2 pi j / resolution); triangles [4 * resolution, 3].
    """
    n = int(resolution)
    theta = (np.pi * 2.0 / n) * np.arange(n)
    ring = np.stack([np.cos(theta) * radius, np.sin(theta) * radius], 1)
    top = np.concatenate([ring, np.full((n, 1), height * 0.5)], 1)
    bottom = np.concatenate([ring, np.full((n, 1), height * 0.5 - height)], 1)  # open3d: h/2 - h_step
    v = np.concatenate([[[0.0, 0.0, height * 0.5], [0.0, 0.0, -height * 0.5]], top, bottom])
    tris = _cap_triangles(2, 2 + n, n) + _ring_triangles(2, 2, n)
    return v.astype(np.float64), np.array(tris, np.int32)


def create_sphere(radius: float, resolution: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """open3d's ``create_sphere(radius, resolution)``: UV sphere centred at the origin, poles on z.

    Vertices [2 * resolution * (resolution - 1) + 2, 3]: north pole, south pole, then
    ``resolution - 1`` rings of ``2 * resolution`` vertices from north to south; triangles
    [4 * resolution * (resolution - 1), 3].
    """
    n = int(resolution)
    step = np.pi / n
    alpha = step * np.arange(1, n)[:, None]                                  # [n - 1, 1]
    theta = step * np.arange(2 * n)[None, :]                                 # [1, 2n]
    rings = np.stack([np.sin(alpha) * np.cos(theta), np.sin(alpha) * np.sin(theta),
                      np.broadcast_to(np.cos(alpha), (n - 1, 2 * n))], -1) * radius
    v = np.concatenate([[[0.0, 0.0, radius], [0.0, 0.0, -radius]], rings.reshape(-1, 3)])
    tris = _cap_triangles(2, 2 + 2 * n * (n - 2), 2 * n) + _ring_triangles(2, n - 1, 2 * n)
    return v.astype(np.float64), np.array(tris, np.int32)


def box(lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned box from corner ``lo`` [3] to ``hi`` [3]: vertices [8, 3], triangles [12, 3]."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    w, h, d = hi - lo
    v, f = create_box(w, h, d)
    return v.astype(np.float32) + lo.astype(np.float32), f


def cylinder(radius: float, height: float, centre, axis: str = "z",
             resolution: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Closed cylinder of ``height`` along ``axis`` ("y" or "z") centred at ``centre`` [3]."""
    v, f = create_cylinder(radius, height, resolution)
    v = v.astype(np.float32)
    if axis == "y":
        v = v[:, [0, 2, 1]]  # swapping two axes mirrors the mesh, so flip the winding back
        f = f[:, [0, 2, 1]]
    elif axis != "z":
        raise ValueError(f"cylinder axis must be 'y' or 'z', got {axis!r}")
    return v + np.asarray(centre, np.float32), f


def sphere(radius: float, centre, resolution: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """UV sphere of ``radius`` centred at ``centre`` [3]."""
    v, f = create_sphere(radius, resolution)
    return v.astype(np.float32) + np.asarray(centre, np.float32), f
