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

Rays and vertices share one frame (the generator's street frame). Ties (a ray through an edge
shared by two triangles at the same distance) go to the lower triangle index; Embree may pick
the other one. With the ``BARY_EPS`` slack that closes float32 cracks, a ray within about 1e-6
(barycentric) of a silhouette edge may also hit where Embree just misses. These edge rays (a few
per million on a street view) are the only expected differences besides float rounding
(distances agree to about 1e-6 relative).
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
        raise ValueError(f"--device {device!r} (ray casting) is not a torch device: use auto, cpu, cuda "
                         f"or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} (ray casting): CUDA is not available here; use --device cpu "
                         f"or auto")
    return dev


@dataclass
class _Triangles:
    """Möller–Trumbore inputs on the device, components first (struct of arrays), plus a pad slot.

    Attributes:
        data: [9, T + 1] float32 rows v0 x y z, e1 = v1 - v0 x y z, e2 = v2 - v0 x y z; the last
            column is NaN (the padding slot of partly filled leaves: never hit).
        index: [T + 1] int64 triangle index in the caller's mesh (-1 for the pad slot).
    """

    data: torch.Tensor
    index: torch.Tensor

    @staticmethod
    def make(vertices: np.ndarray, triangles: np.ndarray, index: np.ndarray, device: torch.device) -> "_Triangles":
        c = vertices[triangles].astype(np.float32)                           # [T, 3, 3]
        rows = np.concatenate([c[:, 0], c[:, 1] - c[:, 0], c[:, 2] - c[:, 0]], 1).T     # [9, T]
        rows = np.concatenate([rows, np.full((9, 1), np.nan, np.float32)], 1)
        idx = np.append(np.asarray(index, np.int64), -1)
        return _Triangles(torch.from_numpy(np.ascontiguousarray(rows)).to(device), torch.from_numpy(idx).to(device))

    @property
    def pad(self) -> int:
        return len(self.index) - 1


def _moller_trumbore(o: torch.Tensor, d: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Hit distance [...] of rays ``o``, ``d`` [3, ...] with triangles ``tri`` [9, ...] (broadcast;
    inf where missed; only t >= 0 counts, as Embree's tnear = 0)."""
    ox, oy, oz = o
    dx, dy, dz = d
    v0x, v0y, v0z, ax, ay, az, bx, by, bz = tri                          # a = e1, b = e2
    px, py, pz = dy * bz - dz * by, dz * bx - dx * bz, dx * by - dy * bx  # p = d x e2
    det = ax * px + ay * py + az * pz
    sx, sy, sz = ox - v0x, oy - v0y, oz - v0z
    qx, qy, qz = sy * az - sz * ay, sz * ax - sx * az, sx * ay - sy * ax  # q = s x e1
    inv = 1.0 / det
    u = (sx * px + sy * py + sz * pz) * inv
    v = (dx * qx + dy * qy + dz * qz) * inv
    t = (bx * qx + by * qy + bz * qz) * inv
    # A tolerance of BARY_EPS closes float32 cracks along edges shared by two triangles.
    hit = (det != 0) & (u >= -BARY_EPS) & (v >= -BARY_EPS) & (u + v <= 1 + BARY_EPS) & (t >= 0)
    return torch.where(hit, t, torch.inf)


def _slab(o: torch.Tensor, inv_d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances [...] of rays [3, ...] through boxes [3, ...] (NaN boxes: NaN, no hit)."""
    a, b = (lo - o) * inv_d, (hi - o) * inv_d
    near, far = torch.minimum(a, b), torch.maximum(a, b)
    return (torch.maximum(torch.maximum(near[0], near[1]), near[2]),
            torch.minimum(torch.minimum(far[0], far[1]), far[2]))


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
        c = torch.from_numpy(corners.astype(np.float32)).to(self.device)
        n = torch.linalg.cross(c[:, 1] - c[:, 0], c[:, 2] - c[:, 0])
        self._normal = torch.cat([n / n.norm(dim=-1, keepdim=True), torch.zeros((1, 3), device=self.device)])

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
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a.T, np.float32)).to(self.device)  # noqa: E731
        self._levels = [(to(lo), to(hi)) for lo, hi in reversed(boxes)]  # [3, nodes], root's children first
        self._slots = torch.from_numpy(slots).to(self.device)

    # ------------------------------------------------------------------ casting

    def cast_rays(self, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """First hits of ``rays`` [N, 6] (origin, direction; float32).

        Returns ``t`` [N] float32 (inf = miss), triangle index [N] int64 (-1 = miss), unit
        geometric normal ``normalize(cross(v1 - v0, v2 - v0))`` [N, 3] float32 (zeros on a miss).
        """
        rays_t = torch.from_numpy(np.ascontiguousarray(rays, np.float32).reshape(-1, 6))
        out_t, out_k = [torch.zeros(0, device=self.device)], [torch.zeros(0, dtype=torch.int64, device=self.device)]
        with torch.no_grad():
            for chunk in rays_t.split(self.ray_chunk):
                t, k = self._first_hits(chunk.to(self.device).T.contiguous())
                out_t.append(t)
                out_k.append(k)
            t, k = torch.cat(out_t), torch.cat(out_k)
            normal = self._normal[k]  # k = -1 picks the zero row
        return t.cpu().numpy(), k.cpu().numpy(), normal.cpu().numpy()

    def test_occlusions(self, rays: np.ndarray) -> np.ndarray:
        """[N] bool: does any triangle lie at ``t`` >= 0 along ``rays`` [N, 6]."""
        rays_t = torch.from_numpy(np.ascontiguousarray(rays, np.float32).reshape(-1, 6))
        out = [torch.zeros(0, dtype=torch.bool, device=self.device)]
        with torch.no_grad():
            for chunk in rays_t.split(self.ray_chunk):
                out.append(self._any_hit(chunk.to(self.device).T.contiguous()))
        return torch.cat(out).cpu().numpy()

    def _big_hits(self, o: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Brute force against the big triangles: per ray [3, R] nearest ``t`` [R] and mesh index [R]."""
        R = o.shape[1]
        best_t = torch.full((R,), torch.inf, device=self.device)
        best_k = torch.full((R,), -1, dtype=torch.int64, device=self.device)
        # One triangle at a time over all rays; a tie keeps the earlier (lower index) triangle.
        for j in range(self._big.pad):
            t = _moller_trumbore(o, d, self._big.data[:, j, None])
            better = t < best_t
            best_t = torch.where(better, t, best_t)
            best_k = torch.where(better, self._big.index[j], best_k)
        return best_t, best_k

    def _candidate_leaves(self, o: torch.Tensor, inv_d: torch.Tensor, t_max: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ray, leaf, entry distance) pairs whose leaf box the ray [3, R] enters before ``t_max`` [R].

        Each level tests a (ray, parent) pair against all ``branching`` children at once, so a
        ray's origin and direction are gathered once per parent, not once per child.
        """
        B = self.branching
        ray = torch.arange(o.shape[1], device=self.device)
        node = torch.zeros_like(ray)
        t_in = torch.zeros(o.shape[1], device=self.device)
        for lo, hi in self._levels:
            lo, hi = lo.view(3, -1, B), hi.view(3, -1, B)
            keep_r, keep_n, keep_t = [], [], []
            for r, n in zip(ray.split(self.pair_chunk // B), node.split(self.pair_chunk // B)):
                tn, tf = _slab(o[:, r, None], inv_d[:, r, None], lo[:, n], hi[:, n])   # [P, B]
                keep = (tn <= tf) & (tf >= 0) & (tn <= t_max[r, None])
                p, c = keep.nonzero(as_tuple=True)
                keep_r.append(r[p])
                keep_n.append(n[p] * B + c)
                keep_t.append(tn[p, c])
            ray, node, t_in = torch.cat(keep_r), torch.cat(keep_n), torch.cat(keep_t)
        return ray, node, t_in

    def _leaf_hits(self, o: torch.Tensor, d: torch.Tensor, ray: torch.Tensor, leaf: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hits (ray, t, column of ``self._tri``) of the triangles in the (ray, leaf) pairs."""
        L = self.leaf_size
        rs, ts, ks = [ray[:0]], [o[0, :0]], [ray[:0]]
        for r, n in zip(ray.split(self.pair_chunk // L), leaf.split(self.pair_chunk // L)):
            k = self._slots[n]                                                  # [P, L]
            t = _moller_trumbore(o[:, r, None], d[:, r, None], self._tri.data[:, k])
            hit = torch.isfinite(t)
            rs.append(r[:, None].expand_as(k)[hit])
            ts.append(t[hit])
            ks.append(k[hit])
        return torch.cat(rs), torch.cat(ts), torch.cat(ks)

    @staticmethod
    def _nearest_first(ray: torch.Tensor, leaf: torch.Tensor, t_in: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (ray, leaf, entry) pairs sorted by ray, then entry distance, and [P] bool marking
        each ray's nearest leaf."""
        order = torch.argsort(t_in, stable=True)
        order = order[torch.argsort(ray[order], stable=True)]
        ray, leaf, t_in = ray[order], leaf[order], t_in[order]
        first = torch.ones_like(ray, dtype=torch.bool)
        first[1:] = ray[1:] != ray[:-1]
        return ray, leaf, t_in, first

    def _first_hits(self, rays: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest hit ``t`` [R] and mesh triangle index [R] (-1 on a miss) of rays [6, R]."""
        o, d = rays[:3], rays[3:]
        big_t, big_k = self._big_hits(o, d)
        if not self._tri.pad:
            return big_t, big_k
        inv_d = 1.0 / torch.where(d == 0, 1e-30, d)
        ray, leaf, t_in, first = self._nearest_first(*self._candidate_leaves(o, inv_d, big_t))
        # First each ray's nearest leaf box, then only the leaves it enters before that hit.
        hits = [self._leaf_hits(o, d, ray[first], leaf[first])]
        near_t = big_t.scatter_reduce(0, hits[0][0], hits[0][1], "amin")
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
        """[R] bool: any triangle at t >= 0 along rays [6, R] (big triangles first, then the BVH)."""
        o, d = rays[:3], rays[3:]
        blocked = torch.isfinite(self._big_hits(o, d)[0])
        if not self._tri.pad:
            return blocked
        todo = torch.nonzero(~blocked).squeeze(1)
        if len(todo):
            o2, d2 = o[:, todo], d[:, todo]
            inv_d = 1.0 / torch.where(d2 == 0, 1e-30, d2)
            no_limit = torch.full((len(todo),), torch.inf, device=self.device)
            ray, leaf, _, first = self._nearest_first(*self._candidate_leaves(o2, inv_d, no_limit))
            # The nearest leaf usually blocks (shadow rays start on a surface): test the rest
            # only for rays it did not block.
            hit = torch.zeros(len(todo), dtype=torch.bool, device=self.device)
            hit[self._leaf_hits(o2, d2, ray[first], leaf[first])[0]] = True
            rest = ~first & ~hit[ray]
            hit[self._leaf_hits(o2, d2, ray[rest], leaf[rest])[0]] = True
            blocked[todo] = hit
        return blocked
