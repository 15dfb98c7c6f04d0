"""Pure-torch ray casting against a triangle soup: the open3d-free backend of ``sensors.Raycaster``.

What it reproduces of open3d's ``RaycastingScene`` (Embree): ``cast_rays`` returns per ray the
first hit distance ``t`` >= 0 in units of the ray direction's length (inf = miss), the hit
triangle's index (-1 = miss, where open3d says INVALID_ID) and its unit geometric normal
``normalize(cross(v1 - v0, v2 - v0))`` (zeros on a miss); ``test_occlusions`` says whether any
triangle lies at ``t`` >= 0. Triangles are two-sided, as in Embree.

How: Möller–Trumbore in float32 on any torch device, with two accelerations:

- **big triangles** (ground plane, sidewalk slabs: boxes spanning the whole street, which would
  make every BVH node above them span it too) are tested against every ray by brute force; their
  hits bound each ray's search distance before the BVH is entered;
- the rest sit in a **complete wide BVH** (``branching`` children per node, ``leaf_size``
  triangles per leaf, median splits along the longest axis), traversed breadth-first for a
  chunk of rays at once: (ray, node) pairs whose slab test passes and whose entry distance is
  not beyond the ray's best hit so far expand to (ray, child) pairs. At the leaves each ray's
  nearest leaf box is tested first, which usually finds the hit and prunes the farther leaves.

Ties (a ray through an edge shared by two triangles at the same distance) go to the lower
triangle index; Embree may pick the other one, which is the only expected difference besides
float rounding (distances agree to about 1e-6 relative).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BARY_EPS = 1e-6  # barycentric slack of the triangle test (float32 rounding is about 1e-7 relative)
BIG_TRIANGLE_FRACTION = 0.1  # a triangle whose box diagonal is >= this share of the scene's is "big"


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise ``torch.device(device)`` (e.g. ``cuda:1``)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"ray-casting device {device!r} is not a torch device (use auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"ray-casting device {device!r}: CUDA is not available here; use --device cpu or auto")
    return dev


@dataclass
class _Triangles:
    """Möller–Trumbore inputs on the device, one row per triangle plus a NaN pad row at the end.

    Attributes:
        v0, e1, e2: [T + 1, 3] float32 first vertex and edges ``v1 - v0``, ``v2 - v0``; the last row
            is NaN (a padding slot: never hit).
        index: [T + 1] int64 triangle index in the caller's mesh (-1 for the pad row).
    """

    v0: torch.Tensor
    e1: torch.Tensor
    e2: torch.Tensor
    index: torch.Tensor

    @staticmethod
    def make(vertices: np.ndarray, triangles: np.ndarray, index: np.ndarray, device: torch.device) -> "_Triangles":
        corners = vertices[triangles].astype(np.float32)                     # [T, 3, 3]
        corners = np.concatenate([corners, np.full((1, 3, 3), np.nan, np.float32)])
        c = torch.from_numpy(corners).to(device)
        idx = torch.from_numpy(np.append(index, -1).astype(np.int64)).to(device)
        return _Triangles(c[:, 0], c[:, 1] - c[:, 0], c[:, 2] - c[:, 0], idx)

    @property
    def pad(self) -> int:
        return len(self.index) - 1


def _moller_trumbore(o: torch.Tensor, d: torch.Tensor, tri: _Triangles, k: torch.Tensor) -> torch.Tensor:
    """Hit distance of rays ``o``, ``d`` [..., 3] with triangles ``k`` [...] (inf where missed; t >= 0)."""
    e1, e2 = tri.e1[k], tri.e2[k]
    p = torch.linalg.cross(d, e2)
    det = (e1 * p).sum(-1)
    inv = 1.0 / det
    s = o - tri.v0[k]
    u = (s * p).sum(-1) * inv
    q = torch.linalg.cross(s, e1)
    v = (d * q).sum(-1) * inv
    t = (e2 * q).sum(-1) * inv
    # A tolerance of BARY_EPS closes float32 cracks along edges shared by two triangles.
    hit = (det != 0) & (u >= -BARY_EPS) & (v >= -BARY_EPS) & (u + v <= 1 + BARY_EPS) & (t >= 0)
    return torch.where(hit, t, torch.full_like(t, torch.inf))


def _slab(o: torch.Tensor, inv_d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances [P] of rays [P, 3] through boxes [P, 3] (NaN boxes give NaN: no hit)."""
    a, b = (lo - o) * inv_d, (hi - o) * inv_d
    return torch.minimum(a, b).amax(-1), torch.maximum(a, b).amin(-1)


def _median_split_leaves(centroids: np.ndarray, leaf_size: int, depth: int) -> np.ndarray:
    """Leaf of each triangle [T] in a complete binary tree of ``depth`` levels (``2**depth`` leaves).

    Level by level, every node splits its triangles at the median of its longest centroid axis,
    rounded so that the left child's leaves are full and both children fit their capacity.
    """
    n_tri = len(centroids)
    node = np.zeros(n_tri, np.int64)
    for level in range(depth):
        n_nodes = 1 << level
        capacity = leaf_size << (depth - level)
        lo = np.full((n_nodes, 3), np.inf)
        hi = np.full((n_nodes, 3), -np.inf)
        np.minimum.at(lo, node, centroids)
        np.maximum.at(hi, node, centroids)
        axis = np.argmax(np.nan_to_num(hi - lo, neginf=0.0), 1)
        key = centroids[np.arange(n_tri), axis[node]]
        order = np.lexsort((key, node))
        counts = np.bincount(node, minlength=n_nodes)
        starts = np.cumsum(counts) - counts
        rank = np.empty(n_tri, np.int64)
        rank[order] = np.arange(n_tri) - starts[node[order]]
        half = capacity // 2
        left = -(-((counts + 1) // 2) // leaf_size) * leaf_size           # ceil(n / 2) up to full leaves
        left = np.clip(np.minimum(left, counts), counts - half, half)
        node = 2 * node + (rank >= left[node])
    return node


class TorchMesh:
    """One triangle soup prepared for ray casting on ``device`` (build once, cast many times).

    Args:
        vertices: [V, 3] float32 positions (any frame; rays must be in the same frame).
        triangles: [T, 3] int vertex indices.
        device: torch device of the casts (rays come in and results go out as numpy).
        leaf_size: triangles per BVH leaf; branching: children per BVH node (a power of two).
        ray_chunk: rays traversed together (bounds memory with ``pair_chunk``).
        pair_chunk: (ray, node) or (ray, triangle) pairs tested in one tensor operation.
    """

    def __init__(self, vertices: np.ndarray, triangles: np.ndarray, device: torch.device | str = "cpu",
                 leaf_size: int = 8, branching: int = 8, ray_chunk: int | None = None,
                 pair_chunk: int | None = None):
        if branching < 2 or branching & (branching - 1):
            raise ValueError(f"TorchMesh branching={branching} must be a power of two >= 2")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.ray_chunk = ray_chunk or (1 << 19 if cuda else 1 << 15)
        self.pair_chunk = pair_chunk or (1 << 23 if cuda else 1 << 19)
        self.branching, self.leaf_size = branching, leaf_size
        vertices = np.asarray(vertices, np.float32)
        triangles = np.asarray(triangles, np.int64).reshape(-1, 3)
        self.num_triangles = len(triangles)
        corners = vertices[triangles].astype(np.float64)                  # [T, 3, 3]
        if self.num_triangles:
            lo, hi = corners.min(1), corners.max(1)
            scene = np.linalg.norm(hi.max(0) - lo.min(0))
            big = np.linalg.norm(hi - lo, axis=1) >= BIG_TRIANGLE_FRACTION * scene
        else:
            big = np.zeros(0, bool)
        self._big = _Triangles.make(vertices, triangles[big], np.flatnonzero(big), self.device)
        small = np.flatnonzero(~big)
        self._tri = _Triangles.make(vertices, triangles[small], small, self.device)
        self._build_bvh(corners[small])

    # ------------------------------------------------------------------ build

    def _build_bvh(self, corners: np.ndarray) -> None:
        """Leaf slots [n_leaves, leaf_size] and per-level node boxes (padded by a float32 margin)."""
        L, b = self.leaf_size, self.branching.bit_length() - 1
        n = len(corners)
        levels = 1
        while L * self.branching ** levels < n:
            levels += 1
        leaf = _median_split_leaves(corners.mean(1), L, b * levels) if n else np.zeros(0, np.int64)
        n_leaves = self.branching ** levels
        order = np.argsort(leaf, kind="stable")
        counts = np.bincount(leaf, minlength=n_leaves)
        slot = np.arange(n) - (np.cumsum(counts) - counts)[leaf[order]]
        slots = np.full((n_leaves, L), n, np.int64)                       # n = the NaN pad row
        slots[leaf[order], slot] = order
        padded = np.concatenate([corners, np.full((1, 3, 3), np.nan)])[slots]  # [n_leaves, L, 3, 3]
        # fmin/fmax skip NaN pads; an empty leaf keeps a NaN box, which no slab test passes
        lo = np.fmin.reduce(padded.reshape(n_leaves, -1, 3), 1)
        hi = np.fmax.reduce(padded.reshape(n_leaves, -1, 3), 1)
        # float32 rounding in the slab test must never cull a box a triangle test would hit
        margin = 1e-5 * (np.nanmax(np.abs(corners)) if n else 1.0) + 1e-6
        lo, hi = lo - margin, hi + margin
        boxes = [(lo, hi)]
        for _ in range(levels - 1):
            lo = np.fmin.reduce(lo.reshape(-1, self.branching, 3), 1)
            hi = np.fmax.reduce(hi.reshape(-1, self.branching, 3), 1)
            boxes.append((lo, hi))
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(self.device)  # noqa: E731
        self._levels = [(to(lo), to(hi)) for lo, hi in reversed(boxes)]  # root's children first
        self._slots = torch.from_numpy(slots).to(self.device)

    # ------------------------------------------------------------------ casting

    def cast_rays(self, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """First hits of ``rays`` [N, 6] (origin, direction; float32).

        Returns ``t`` [N] float32 (inf = miss), triangle index [N] int64 (-1 = miss), unit
        geometric normal [N, 3] float32 (zeros on a miss).
        """
        rays_t = torch.from_numpy(np.ascontiguousarray(rays, np.float32).reshape(-1, 6))
        out_t, out_k = [], []
        with torch.no_grad():
            for chunk in rays_t.split(self.ray_chunk):
                t, k = self._first_hits(chunk.to(self.device))
                out_t.append(t)
                out_k.append(k)
            t = torch.cat(out_t) if out_t else torch.zeros(0, device=self.device)
            k = torch.cat(out_k) if out_k else torch.zeros(0, dtype=torch.int64, device=self.device)
            normal = self._normals(k)
        return t.cpu().numpy(), k.cpu().numpy(), normal.cpu().numpy()

    def test_occlusions(self, rays: np.ndarray) -> np.ndarray:
        """[N] bool: does any triangle lie at ``t`` >= 0 along ``rays`` [N, 6]."""
        rays_t = torch.from_numpy(np.ascontiguousarray(rays, np.float32).reshape(-1, 6))
        out = []
        with torch.no_grad():
            for chunk in rays_t.split(self.ray_chunk):
                out.append(self._any_hit(chunk.to(self.device)))
        return torch.cat(out).cpu().numpy() if out else np.zeros(0, bool)

    def _normals(self, k: torch.Tensor) -> torch.Tensor:
        """Unit ``cross(v1 - v0, v2 - v0)`` [N, 3] of the mesh triangles ``k`` [N] (-1 -> zeros)."""
        normal = torch.zeros((len(k), 3), device=self.device)
        hit = k >= 0
        if hit.any():
            # Look the triangle up in whichever of the two sets holds it.
            e1 = torch.zeros((self.num_triangles, 3), device=self.device)
            e2 = torch.zeros_like(e1)
            for tri in (self._big, self._tri):
                e1[tri.index[:-1]] = tri.e1[:-1]
                e2[tri.index[:-1]] = tri.e2[:-1]
            n = torch.linalg.cross(e1[k[hit]], e2[k[hit]])
            normal[hit] = n / n.norm(dim=-1, keepdim=True)
        return normal

    def _big_hits(self, o: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Brute force against the big triangles: per ray nearest ``t`` [R] and mesh index [R]."""
        best_t = torch.full((len(o),), torch.inf, device=self.device)
        best_k = torch.full((len(o),), -1, dtype=torch.int64, device=self.device)
        # A handful of triangles, in groups of 8 to bound memory. Within a group argmin keeps the
        # first (lowest index) of equal distances; across groups a tie keeps the earlier group.
        for js in torch.arange(self._big.pad, device=self.device).split(8):
            t = _moller_trumbore(o[:, None], d[:, None], self._big, js[None].expand(len(o), -1))
            t, j = t.min(1)
            better = t < best_t
            best_t = torch.where(better, t, best_t)
            best_k = torch.where(better & torch.isfinite(t), self._big.index[js][j], best_k)
        return best_t, best_k

    def _candidate_leaves(self, o: torch.Tensor, inv_d: torch.Tensor, t_max: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ray, leaf, entry distance) pairs whose leaf box the ray enters before ``t_max`` [R].

        Each level tests a (ray, parent) pair against all ``branching`` children at once, so a
        ray's origin and direction are gathered once per parent, not once per child.
        """
        B = self.branching
        ray = torch.arange(len(o), device=self.device)
        node = torch.zeros_like(ray)
        t_in = torch.zeros(len(o), device=self.device)
        for lo, hi in self._levels:
            lo, hi = lo.view(-1, B, 3), hi.view(-1, B, 3)
            keep_r, keep_n, keep_t = [], [], []
            for r, n in zip(ray.split(self.pair_chunk // B), node.split(self.pair_chunk // B)):
                tn, tf = _slab(o[r, None], inv_d[r, None], lo[n], hi[n])            # [P, B]
                keep = (tn <= tf) & (tf >= 0) & (tn <= t_max[r, None])
                p, c = keep.nonzero(as_tuple=True)
                keep_r.append(r[p])
                keep_n.append(n[p] * B + c)
                keep_t.append(tn[p, c])
            ray, node, t_in = torch.cat(keep_r), torch.cat(keep_n), torch.cat(keep_t)
        return ray, node, t_in

    def _leaf_hits(self, o: torch.Tensor, d: torch.Tensor, ray: torch.Tensor, leaf: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hits (ray, t, row in ``self._tri``) of the triangles in the (ray, leaf) pairs."""
        L = self.leaf_size
        rs, ts, ks = [], [], []
        for r, n in zip(ray.split(self.pair_chunk // L), leaf.split(self.pair_chunk // L)):
            k = self._slots[n]                                                  # [P, L]
            t = _moller_trumbore(o[r, None], d[r, None], self._tri, k)
            hit = torch.isfinite(t)
            rs.append(r[:, None].expand_as(k)[hit])
            ts.append(t[hit])
            ks.append(k[hit])
        return torch.cat(rs), torch.cat(ts), torch.cat(ks)

    def _first_hits(self, rays: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest hit ``t`` [R] and mesh triangle index [R] (-1 on a miss) of a chunk of rays."""
        o, d = rays[:, :3], rays[:, 3:]
        big_t, big_k = self._big_hits(o, d)
        if not self._tri.pad:
            return big_t, big_k
        inv_d = 1.0 / torch.where(d == 0, torch.full_like(d, 1e-30), d)
        ray, leaf, t_in = self._candidate_leaves(o, inv_d, big_t)
        # First each ray's nearest leaf box, then only the leaves it enters before that hit.
        order = torch.argsort(t_in, stable=True)
        order = order[torch.argsort(ray[order], stable=True)]
        ray, leaf, t_in = ray[order], leaf[order], t_in[order]
        first = torch.ones_like(ray, dtype=torch.bool)
        first[1:] = ray[1:] != ray[:-1]
        hits = [self._leaf_hits(o, d, ray[first], leaf[first])]
        near_t = big_t.clone().scatter_reduce_(0, hits[0][0], hits[0][1], "amin")
        rest = ~first & (t_in <= near_t[ray])
        hits.append(self._leaf_hits(o, d, ray[rest], leaf[rest]))
        hit_ray = torch.cat([h[0] for h in hits])
        hit_t = torch.cat([h[1] for h in hits])
        hit_k = self._tri.index[torch.cat([h[2] for h in hits])]
        t = big_t.scatter_reduce(0, hit_ray, hit_t, "amin")
        # Ties at the nearest distance (shared edges) go to the lowest triangle index.
        none = torch.iinfo(torch.int64).max
        k = torch.where(torch.isfinite(big_t) & (big_t == t), big_k, none)
        at_best = hit_t == t[hit_ray]
        k = k.scatter_reduce(0, hit_ray[at_best], hit_k[at_best], "amin")
        return t, torch.where(k == none, -1, k)

    def _any_hit(self, rays: torch.Tensor) -> torch.Tensor:
        """[R] bool: any triangle at t >= 0 (big triangles first, then the BVH for the rest)."""
        o, d = rays[:, :3], rays[:, 3:]
        blocked = torch.isfinite(self._big_hits(o, d)[0])
        if not self._tri.pad:
            return blocked
        todo = torch.nonzero(~blocked).squeeze(1)
        if len(todo):
            o2, d2 = o[todo], d[todo]
            inv_d = 1.0 / torch.where(d2 == 0, torch.full_like(d2, 1e-30), d2)
            ray, leaf, _ = self._candidate_leaves(o2, inv_d, torch.full((len(todo),), torch.inf, device=self.device))
            hit_ray = self._leaf_hits(o2, d2, ray, leaf)[0]
            blocked[todo[hit_ray]] = True
        return blocked
