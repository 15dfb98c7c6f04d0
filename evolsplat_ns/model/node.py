"""Gaussian containers: per-segment anchor nodes and the predicted Gaussian parameters.

A :class:`GaussianNode` is plain data (no ``nn.Parameter``): EVolSplat predicts every Gaussian
attribute with networks, so the only per-point state that persists across training steps is the
anchor geometry/colour and the offset cache written back after each step.

All positions are in the **segment frame** (vehicle frame at the segment's first frame, metres).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence, Union

import torch

from evolsplat_ns.data.types import PointCloud
from evolsplat_ns.model.render.sh import rgb_to_sh0, sh0_to_rgb

def _knn_brute(
    queries: torch.Tensor, points: torch.Tensor, k: int, max_block_elems: int = 2**24
) -> torch.Tensor:
    """[Q, k] distances from ``queries`` [Q, 3] (rows of ``points`` [N, 3]) to their k nearest
    other points, by blocks of ``torch.cdist`` capped at ``max_block_elems`` entries."""
    rows = max(1, max_block_elems // points.shape[0])
    out = [
        # k+1 smallest includes the zero self-distance; a duplicate point counts as a neighbour
        # at distance 0 (duplicated returns should get tiny Gaussians).
        torch.cdist(block, points, compute_mode="donot_use_mm_for_euclid_dist")
        .topk(k + 1, dim=1, largest=False)
        .values[:, 1:]
        for block in queries.split(rows)
    ]
    return torch.cat(out) if out else queries.new_zeros(0, k)


def _segment_ranks(segment: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order pairs by (segment, value) and give each its rank inside its segment."""
    order = torch.argsort(value, stable=True)
    order = order[torch.argsort(segment[order], stable=True)]
    seg = segment[order]
    first = torch.searchsorted(seg, seg, side="left")
    return order, torch.arange(seg.shape[0], device=seg.device) - first


def _knn_in_cells(
    points: torch.Tensor, queries: torch.Tensor, k: int, cell: float, max_pairs: int
) -> torch.Tensor:
    """[Q, k] k-NN distances of points ``queries`` [Q] (indices) among the points in the 27 hash cells
    of edge ``cell`` around each query (inf where fewer than k). Exact wherever the k-th distance is
    <= ``cell``: every point that close lies in those 27 cells."""
    offsets = torch.stack(
        torch.meshgrid(*[torch.arange(-1, 2, device=points.device)] * 3, indexing="ij"), -1
    ).reshape(-1, 3)
    ijk = torch.floor((points - points.min(dim=0).values) / cell).long() + 1  # margin for offset -1
    dims = ijk.max(dim=0).values + 2
    keys = (ijk[:, 0] * dims[1] + ijk[:, 1]) * dims[2] + ijk[:, 2]
    sorted_keys, order = torch.sort(keys)
    nb = ijk[queries, None, :] + offsets  # [Q, 27, 3]
    nb_keys = (nb[..., 0] * dims[1] + nb[..., 1]) * dims[2] + nb[..., 2]
    starts = torch.searchsorted(sorted_keys, nb_keys)
    counts = torch.searchsorted(sorted_keys, nb_keys, side="right") - starts
    out = torch.full((queries.shape[0], k), float("inf"), dtype=points.dtype, device=points.device)
    per_query = counts.sum(dim=1)
    chunk_id = torch.cumsum(per_query, 0) // max_pairs
    for c in torch.unique(chunk_id).tolist():
        rows = (chunk_id == c).nonzero()[:, 0]
        cnt = counts[rows].reshape(-1)
        owner = torch.repeat_interleave(rows.repeat_interleave(27), cnt)
        seg_start = torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
        within = torch.arange(cnt.sum(), device=points.device) - seg_start
        pos = torch.repeat_interleave(starts[rows].reshape(-1), cnt) + within
        cand = order[pos]
        dist = (points[queries[owner]] - points[cand]).norm(dim=-1)
        dist = torch.where(cand == queries[owner], float("inf"), dist)
        pair_order, rank = _segment_ranks(owner, dist)
        top = rank < k
        out[owner[pair_order][top], rank[top]] = dist[pair_order][top]
    return out


def knn_mean_distance(
    points: torch.Tensor, k: int = 3, max_pairs: int = 2**23, max_rounds: int = 10
) -> torch.Tensor:
    """Exact mean Euclidean distance of every point to its ``k`` nearest other points.

    A voxel-hash search: the cell edge starts small (the 10th percentile k-NN distance of a random
    sample, so dense clusters don't flood cells), each point's candidates are the points in its 27
    neighbouring cells, and points whose k-th neighbour may lie farther than one cell are retried
    with doubled cells (after ``max_rounds``, brute force). Memory is
    bounded by ``max_pairs`` candidate pairs per chunk, so 200k-point clouds fit on CPU and GPU.

    Args:
        points: [N, 3] positions (any frame, metres), N > k.
        k: neighbours averaged.
    Returns:
        [N] mean distance to the k nearest neighbours (the point itself excluded).
    """
    n = points.shape[0]
    if n <= k:
        raise ValueError(f"knn scale init needs more than k={k} points, got {n}")
    gen = torch.Generator().manual_seed(0)
    sample = torch.randperm(n, generator=gen)[: min(n, 512)].to(points.device)
    cell = _knn_brute(points[sample], points, k)[:, -1].quantile(0.1).clamp(min=1e-6).item()
    dists = torch.empty(n, k, dtype=points.dtype, device=points.device)
    todo = torch.arange(n, device=points.device)
    for _ in range(max_rounds):
        if todo.numel() == 0:
            break
        found = _knn_in_cells(points, todo, k, cell, max_pairs)
        exact = found[:, -1] <= cell
        dists[todo[exact]] = found[exact]
        todo = todo[~exact]
        cell *= 2.0
    dists[todo] = _knn_brute(points[todo], points, k)
    return dists.mean(dim=1)


@dataclass
class GaussianNode:
    """Anchor Gaussians of one segment (segment frame). Plain tensors, never trained directly.

    Attributes:
        means: [N, 3] anchor positions (point-cloud coordinates), no grad.
        features_dc: [N, 3] SH degree-0 anchor colour, ``(rgb - 0.5) / SH_C0`` (the colour head's
            base and the volume's input colour).
        scales: [N, 3] log scales (base the scale head adds its residual to).
        offset: [N, 3] cached position offset predicted at the last step (zeros at init).
    """

    means: torch.Tensor
    features_dc: torch.Tensor
    scales: torch.Tensor
    offset: torch.Tensor

    @classmethod
    def from_point_cloud(
        cls,
        pc: PointCloud,
        scale_init: Union[str, float] = "knn",
        scale_range: tuple[float, float] = (1e-3, 1.0),
    ) -> "GaussianNode":
        """Anchor Gaussians at the points of ``pc`` (segment frame).

        Args:
            pc: points [N, 3] (segment frame, metres) and colours [N, 3] in [0, 1].
            scale_init: ``"knn"`` = log of the mean distance to the 3 nearest neighbours, or a
                float = that isotropic scale in metres for every Gaussian.
            scale_range: (min, max) metres the knn scale is clamped to, so isolated points don't
                become huge blobs and duplicates don't get zero-size Gaussians.
        """
        points = pc.points.detach().float()
        colors = pc.colors.detach().float()
        n = points.shape[0]
        if points.ndim != 2 or points.shape[1] != 3 or colors.shape != points.shape:
            raise ValueError(
                f"PointCloud needs points [N, 3] and colors [N, 3], got {tuple(points.shape)} "
                f"and {tuple(colors.shape)}"
            )
        if scale_init == "knn":
            dist = knn_mean_distance(points).clamp(*scale_range)
        elif isinstance(scale_init, (int, float)) and scale_init > 0:
            dist = torch.full((n,), float(scale_init), device=points.device)
        else:
            raise ValueError(f"scale_init must be 'knn' or a positive float (metres), got {scale_init!r}")
        return cls(
            means=points.clone(),
            features_dc=rgb_to_sh0(colors),
            scales=dist.log()[:, None].repeat(1, 3),
            offset=torch.zeros_like(points),
        )

    def __len__(self) -> int:
        return self.means.shape[0]

    def rgb(self) -> torch.Tensor:
        """[N, 3] anchor colour in [0, 1]."""
        return sh0_to_rgb(self.features_dc)

    def current_means(self) -> torch.Tensor:
        """[N, 3] anchor positions moved by the cached offset (segment frame)."""
        return self.means + self.offset

    def update_offset(self, idx: torch.Tensor, offset: torch.Tensor) -> None:
        """Write predicted offsets [M, 3] (segment frame) for node indices ``idx`` [M] to the cache."""
        self.offset[idx.to(self.offset.device)] = offset.detach().to(self.offset)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors for a checkpoint (field name -> tensor)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace every field from ``state`` (as written by :meth:`state_dict`), keeping devices."""
        missing = [f.name for f in fields(self) if f.name not in state]
        if missing:
            raise KeyError(f"GaussianNode checkpoint lacks {missing}; was it written by state_dict()?")
        for f in fields(self):
            setattr(self, f.name, state[f.name].to(self.means.device))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "GaussianNode":
        """A node rebuilt from a :meth:`state_dict` checkpoint (fields of older checkpoints that
        the node no longer has are ignored)."""
        return cls(**{f.name: state[f.name] for f in fields(cls)})

    def nbytes(self) -> int:
        """Bytes held by the node's tensors."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def to(self, device: torch.device | str) -> "GaussianNode":
        """Move every tensor in place to ``device``; returns self."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name).to(device))
        return self


@dataclass
class GaussianParams:
    """Gaussians ready for rasterisation (segment frame).

    Attributes:
        means: [M, 3] centres (segment frame, metres).
        quats: [M, 4] unit quaternions, wxyz.
        scales: [M, 3] linear scales (metres).
        opacities: [M] in (0, 1).
        sh: [M, (sh_degree+1)^2, 3] SH colour coefficients (gsplat layout, DC first).
        index: [M] long, which node Gaussians these are (None for Gaussians not from a node).
        offset: [M, 3] detached predicted offsets for :meth:`GaussianNode.update_offset` (or None).
    """

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    sh: torch.Tensor
    index: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.means.shape[0]

    def head(self, n: int) -> "GaussianParams":
        """The first ``n`` Gaussians (views of the same tensors; index and offset cut alike)."""
        cut = lambda t: None if t is None else t[:n]  # noqa: E731
        return GaussianParams(means=self.means[:n], quats=self.quats[:n], scales=self.scales[:n],
                              opacities=self.opacities[:n], sh=self.sh[:n], index=cut(self.index),
                              offset=cut(self.offset))

    @property
    def sh_degree(self) -> int:
        return int(round(self.sh.shape[1] ** 0.5)) - 1


def concat_gaussians(parts: Sequence[GaussianParams]) -> GaussianParams:
    """One GaussianParams with the Gaussians of ``parts`` (same SH degree) in order; no node index."""
    if len({p.sh.shape[1] for p in parts}) != 1:
        raise ValueError("concat_gaussians: parts have different numbers of SH bases")
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return GaussianParams(means=cat("means"), quats=cat("quats"), scales=cat("scales"),
                          opacities=cat("opacities"), sh=cat("sh"))
