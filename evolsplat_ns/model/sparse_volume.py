"""Sparse 3D feature volume: voxelise a segment's points, run a sparse U-Net, sample features.

Frames: all positions are in the **segment frame** (metres). The voxel grid's origin is the
minimum corner of the points it is built from (no fixed city box), voxel ``i`` (integer triple)
covers ``[origin + i*voxel_size, origin + (i+1)*voxel_size)`` and its feature sits at its centre
``origin + (i + 0.5) * voxel_size``.

The volume is never densified: occupied voxels are kept as sorted int64 linear keys, and
trilinear sampling looks the 8 corner voxels up with ``torch.searchsorted``.

spconv's index pairs (which input voxel feeds which output voxel through which kernel tap) depend
on the voxel set alone; :meth:`SparseCostRegNet.run` returns them as :class:`IndexPairs` and takes
them back, so a caller that knows the voxel set is unchanged (:mod:`evolsplat_ns.model.volume_cache`)
skips their construction, the host-heavy part of the U-Net.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from evolsplat_ns.model.spconv_compat import spconv_device_guard  # first: says which spconv to install

import spconv.pytorch as spconv  # noqa: E402,I001
from spconv.pytorch import functional as spconv_functional  # noqa: E402
from spconv.pytorch.core import IndiceData, SparseConvTensor  # noqa: E402

# The 8 corners of a voxel cell, as (dx, dy, dz) in {0, 1}^3.
_CORNERS = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)], dtype=torch.long)


@functools.lru_cache(maxsize=8)
def _corners(device: torch.device) -> torch.Tensor:
    """``_CORNERS`` on ``device``, copied once (a copy per call would sync the stream each time)."""
    return _CORNERS.to(device)


def _small_tensor(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A few host numbers on ``device`` without a blocking host-to-device copy."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


@dataclass
class VoxelGrid:
    """Occupied voxels of a point set.

    Attributes:
        origin: [3] segment-frame position of the grid's minimum corner (metres).
        voxel_size: edge length (metres).
        shape: (X, Y, Z) number of voxels along each segment-frame axis.
        coords: [V, 3] long voxel indices (x, y, z), sorted by ``keys``.
        keys: [V] long sorted linear keys ``(x * Y + y) * Z + z``.
        features: [V, F] mean input feature (RGB) of the points in each voxel.
    """

    origin: torch.Tensor
    voxel_size: float
    shape: tuple[int, int, int]
    coords: torch.Tensor
    keys: torch.Tensor
    features: torch.Tensor

    def to(self, device: torch.device | str) -> "VoxelGrid":
        """A copy on ``device`` (the same grid where it already is)."""
        return VoxelGrid(self.origin.to(device), self.voxel_size, self.shape, self.coords.to(device),
                         self.keys.to(device), self.features.to(device))

    def nbytes(self) -> int:
        """Bytes held by the grid's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.origin, self.coords, self.keys, self.features))

    def state_dict(self) -> dict:
        """Plain tensors/numbers: int32 voxel indices, no keys (recomputed by :meth:`from_state_dict`),
        24 of the grid's 44 bytes per voxel."""
        return {"origin": self.origin, "voxel_size": self.voxel_size, "shape": list(self.shape),
                "coords": self.coords.to(torch.int32), "features": self.features.detach()}

    @classmethod
    def from_state_dict(cls, s: dict, device: torch.device | str = "cpu") -> "VoxelGrid":
        """The grid of a :meth:`state_dict`, on ``device``."""
        shape = tuple(int(d) for d in s["shape"])
        coords = s["coords"].to(device=device, dtype=torch.long)
        return cls(s["origin"].to(device), float(s["voxel_size"]), shape, coords, linear_keys(coords, shape),
                   s["features"].to(device))


def linear_keys(coords: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Voxel indices [..., 3] (x, y, z) -> int64 linear keys [...] in a grid of ``shape``."""
    return (coords[..., 0] * shape[1] + coords[..., 1]) * shape[2] + coords[..., 2]


def voxelize(points: torch.Tensor, features: torch.Tensor, voxel_size: float) -> VoxelGrid:
    """Quantise ``points`` [N, 3] (segment frame) into voxels and average ``features`` [N, F] per voxel."""
    if points.shape[0] == 0:
        raise ValueError("cannot build a sparse volume from an empty point cloud")
    if voxel_size <= 0:
        raise ValueError(f"voxel_size must be positive (metres), got {voxel_size}")
    points = points.detach()
    origin = points.min(dim=0).values
    coords = torch.floor((points - origin) / voxel_size).long()
    shape = tuple((coords.max(dim=0).values + 1).tolist())  # one host read, not one per axis
    keys, inverse, counts = torch.unique(linear_keys(coords, shape), sorted=True, return_inverse=True,
                                         return_counts=True)
    summed = torch.zeros(keys.shape[0], features.shape[1], dtype=features.dtype, device=features.device)
    summed.index_add_(0, inverse, features.detach())
    voxel_coords = torch.stack(
        [keys // (shape[1] * shape[2]), (keys // shape[2]) % shape[1], keys % shape[2]], dim=-1
    )
    return VoxelGrid(origin, float(voxel_size), shape, voxel_coords, keys, summed / counts[:, None])


@dataclass
class SparseVolume:
    """Output features of the sparse U-Net on the occupied voxels of a :class:`VoxelGrid`.

    Attributes:
        grid: the voxelisation (origin, size, sorted keys) the features belong to.
        features: [V, C] feature of each occupied voxel, aligned with ``grid.keys``.
    """

    grid: VoxelGrid
    features: torch.Tensor

    @property
    def out_dim(self) -> int:
        return self.features.shape[1]

    def detach(self) -> "SparseVolume":
        """Same volume with features cut from the graph (for caching across steps)."""
        return SparseVolume(self.grid, self.features.detach())

    def state_dict(self) -> dict:
        """Plain tensors/numbers (checkpoints, spill files)."""
        g = self.grid
        return {"origin": g.origin, "voxel_size": g.voxel_size, "shape": list(g.shape), "coords": g.coords,
                "keys": g.keys, "voxel_features": g.features, "features": self.features}

    @classmethod
    def from_state_dict(cls, s: dict, device: torch.device | str = "cpu") -> "SparseVolume":
        """The volume of a :meth:`state_dict`, on ``device``."""
        grid = VoxelGrid(s["origin"].to(device), float(s["voxel_size"]), tuple(int(d) for d in s["shape"]),
                         s["coords"].to(device), s["keys"].to(device), s["voxel_features"].to(device))
        return cls(grid, s["features"].to(device))

    def to(self, device: torch.device | str) -> "SparseVolume":
        """A copy on ``device``."""
        return SparseVolume(self.grid.to(device), self.features.to(device))

    def nbytes(self) -> int:
        """Bytes held by the volume's tensors."""
        return self.grid.nbytes() + self.features.numel() * self.features.element_size()

    def sample(self, xyz: torch.Tensor) -> torch.Tensor:
        """Trilinearly interpolate voxel features at positions ``xyz`` [M, 3] (segment frame).

        Corners that are unoccupied (or outside the grid) get weight 0 and the remaining weights
        are renormalised; a position with no occupied corner gets zeros. Differentiable w.r.t.
        ``features`` and ``xyz``.

        Returns:
            [M, C] features.
        """
        g = self.grid
        # Continuous coordinate in which voxel centres sit on integers.
        u = (xyz - g.origin) / g.voxel_size - 0.5
        base = torch.floor(u.detach()).long()
        frac = u - base
        offsets = _corners(xyz.device)
        corners = base[:, None, :] + offsets  # [M, 8, 3]
        shape = _small_tensor(g.shape, torch.long, xyz.device)
        inside = ((corners >= 0) & (corners < shape)).all(dim=-1)
        keys = linear_keys(corners.clamp(min=0), g.shape)
        pos = torch.searchsorted(g.keys, keys).clamp(max=g.keys.shape[0] - 1)
        found = inside & (g.keys[pos] == keys)
        corner_w = torch.where(offsets.bool(), frac[:, None, :], 1 - frac[:, None, :])
        weights = corner_w.prod(dim=-1) * found  # [M, 8]
        total = weights.sum(dim=1, keepdim=True)
        weights = weights / total.clamp(min=1e-12)
        # One fused gather-weighted-sum (and its backward) instead of materialising the [M, 8, C]
        # corner features twice: at 1M points that is 2 GB of memory traffic saved each way.
        return F.embedding_bag(pos, self.features, per_sample_weights=weights.to(self.features.dtype),
                               mode="sum")


@dataclass(frozen=True)
class IndexPairs:
    """spconv's index pairs of one voxel set, for every layer of :class:`SparseCostRegNet`.

    Attributes:
        indices: [V, 4] int32 input voxel indices (batch 0, x, y, z), in the grid's key order.
        by_key: indice_key -> spconv ``IndiceData`` (native algorithm) or ``ImplicitGemmIndiceData``
            of the SubM and strided layers; the inverse layers read their strided partner's entry.
    """

    indices: torch.Tensor
    by_key: dict

    def nbytes(self) -> int:
        """Bytes held by the index tensors (each counted once)."""
        seen: dict[int, torch.Tensor] = {id(self.indices): self.indices}
        for data in self.by_key.values():
            for value in vars(data).values():
                for t in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(t, torch.Tensor):
                        seen[id(t)] = t
        return sum(t.numel() * t.element_size() for t in seen.values())


class PairReusingSparseConv3d(spconv.SparseConv3d):
    """``spconv.SparseConv3d`` that reuses the index pairs its input carries under ``indice_key``.

    spconv itself reuses pairs only in SubM layers (a strided layer asserts "only support reuse
    subm indices"), so with pairs from an earlier step this layer runs spconv's functional conv
    on them; without, it is the plain layer (which records its pairs for the inverse layer).
    Same parameters and state_dict keys as ``SparseConv3d``.
    """

    def forward(self, input: SparseConvTensor, add_input: Optional[SparseConvTensor] = None) -> SparseConvTensor:
        data = input.find_indice_pair(self.indice_key)
        if data is None or add_input is not None:
            return super().forward(input, add_input)
        return self._forward_with(input, data)

    def _forward_with(self, x: SparseConvTensor, data) -> SparseConvTensor:
        """The strided conv of ``x`` [V_in voxels] onto ``data.out_indices`` [V_out, 4], from ``data``'s pairs."""
        same_input = data.indices.shape[0] == x.indices.shape[0] and list(data.spatial_shape) == list(x.spatial_shape)
        if data.is_subm or not same_input:
            raise ValueError(f"cached index pairs under {self.indice_key!r} do not belong to this input "
                             f"({x.indices.shape[0]} voxels in {list(x.spatial_shape)})")
        features, n_out = x.features.contiguous(), data.out_indices.shape[0]
        if isinstance(data, IndiceData):
            out = spconv_functional.indice_conv(features, self.weight, data.indice_pairs, data.indice_pair_num,
                                                n_out, data.algo, x._timer)
        else:
            out = spconv_functional.implicit_gemm(
                features, self.weight, data.pair_fwd, data.pair_bwd, data.pair_mask_fwd_splits,
                data.pair_mask_bwd_splits, data.mask_argsort_fwd_splits, data.mask_argsort_bwd_splits, n_out,
                data.masks, self.training, False, x._timer, self.fp32_accum)
        if self.bias is not None:
            out = out + self.bias
        y = x.replace_feature(out)
        y.indices, y.spatial_shape = data.out_indices, data.out_spatial_shape
        return y


def _subm_block(cin: int, cout: int, key: str) -> spconv.SparseSequential:
    return spconv.SparseSequential(
        spconv.SubMConv3d(cin, cout, 3, padding=1, bias=False, indice_key=key),
        nn.BatchNorm1d(cout),
        nn.ReLU(),
    )


def _down_block(cin: int, cout: int, key: str) -> spconv.SparseSequential:
    return spconv.SparseSequential(
        PairReusingSparseConv3d(cin, cout, 3, stride=2, padding=1, bias=False, indice_key=key),
        nn.BatchNorm1d(cout),
        nn.ReLU(),
    )


def _up_block(cin: int, cout: int, key: str) -> spconv.SparseSequential:
    # Inverse conv with the matching down-block's indice_key returns exactly that block's input
    # voxels, so skip connections add feature rows that are already aligned.
    return spconv.SparseSequential(
        spconv.SparseInverseConv3d(cin, cout, 3, bias=False, indice_key=key),
        nn.BatchNorm1d(cout),
        nn.ReLU(),
    )


class SparseCostRegNet(nn.Module):
    """Sparse 3D U-Net (EVolSplat's volume encoder) on spconv.

    Three stride-2 levels (channels ``out_dim -> 16 -> 32 -> 64``) with SubMConv3d blocks, and
    SparseInverseConv3d upsampling with additive skip connections back to the input voxels.
    On CPU it runs inside :func:`spconv_device_guard` (single-threaded, working backward).
    """

    def __init__(self, in_dim: int = 3, out_dim: int = 32) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.stem = _subm_block(in_dim, out_dim, "subm0")
        self.down1 = spconv.SparseSequential(_down_block(out_dim, 16, "down1"), _subm_block(16, 16, "subm1"))
        self.down2 = spconv.SparseSequential(_down_block(16, 32, "down2"), _subm_block(32, 32, "subm2"))
        self.down3 = spconv.SparseSequential(_down_block(32, 64, "down3"), _subm_block(64, 64, "subm3"))
        self.up3 = _up_block(64, 32, "down3")
        self.up2 = _up_block(32, 16, "down2")
        self.up1 = _up_block(16, out_dim, "down1")

    def forward(self, grid: VoxelGrid) -> torch.Tensor:
        """Features [V, out_dim] of the occupied voxels of ``grid``, in ``grid.keys`` order."""
        return self.run(grid)[0]

    def run(self, grid: VoxelGrid, pairs: Optional[IndexPairs] = None) -> tuple[torch.Tensor, IndexPairs]:
        """Features [V, out_dim] of ``grid``'s voxels (``grid.keys`` order) and the index pairs used.

        ``pairs``: those :meth:`run` returned for this same voxel set (coords and shape), with the
        net in the same train/eval mode on the same device; None builds them.
        """
        if grid.features.shape[1] != self.in_dim:
            raise ValueError(
                f"SparseCostRegNet(in_dim={self.in_dim}) got {grid.features.shape[1]}-dim voxel features"
            )
        if pairs is not None and pairs.indices.shape[0] != grid.coords.shape[0]:
            raise ValueError(f"index pairs of {pairs.indices.shape[0]} voxels given for a grid of "
                             f"{grid.coords.shape[0]}")
        with spconv_device_guard(grid.features.device, self):
            indices = pairs.indices if pairs is not None else _spconv_indices(grid.coords)
            x = spconv.SparseConvTensor(grid.features.to(self.stem[0].weight.dtype), indices, list(grid.shape),
                                        batch_size=1, indice_dict=dict(pairs.by_key) if pairs is not None else None)
            l0 = self.stem(x)
            l1 = self.down1(l0)
            l2 = self.down2(l1)
            l3 = self.down3(l2)
            y = self.up3(l3)
            y = self.up2(y.replace_feature(y.features + l2.features))
            y = self.up1(y.replace_feature(y.features + l1.features))
            return y.features + l0.features, IndexPairs(indices, dict(y.indice_dict))


def _spconv_indices(coords: torch.Tensor) -> torch.Tensor:
    """Voxel indices [V, 3] long -> spconv's [V, 4] int32 (batch 0, x, y, z)."""
    return torch.cat([torch.zeros_like(coords[:, :1]), coords], dim=1).int()


def build_volume(
    net: SparseCostRegNet, points: torch.Tensor, colors: torch.Tensor, voxel_size: float = 0.1
) -> SparseVolume:
    """Voxelise ``points`` [N, 3] (segment frame) with mean ``colors`` [N, 3] and run ``net`` on them."""
    grid = voxelize(points, colors, voxel_size)
    return SparseVolume(grid, net(grid))
