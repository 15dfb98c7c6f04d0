"""Point-cloud operations in torch (run on CPU or GPU): colouring, z-buffers, voxel grid, filters.

Frames: points are in one reference frame (the segment frame); cameras are OpenCV camera-to-that-
frame poses with pixel intrinsics, as in :class:`evolsplat_ns.data.types.Views`.
"""

from __future__ import annotations

import torch

from evolsplat_ns.geometry import invert_rigid, project_points


def zbuffer(uv: torch.Tensor, depth: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Nearest depth per pixel of points already projected into one camera.

    Args:
        uv: [N, 2] pixel coordinates; depth: [N] camera z. Points outside or behind are ignored.
    Returns:
        [H, W] min depth, +inf where no point lands.
    """
    ix, iy = uv[:, 0].floor().long(), uv[:, 1].floor().long()
    ok = (depth > 0) & (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
    buf = torch.full((height * width,), float("inf"), device=uv.device, dtype=depth.dtype)
    buf.scatter_reduce_(0, (iy * width + ix)[ok], depth[ok], reduce="amin")
    return buf.view(height, width)


def colorize(
    points: torch.Tensor,
    images: torch.Tensor,
    Ks: torch.Tensor,
    camtoworlds: torch.Tensor,
    sky_masks: torch.Tensor | None = None,
    depths: torch.Tensor | None = None,
    occlusion_tol: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour points from the first camera that sees them inside the image, unoccluded, not sky.

    Occlusion is judged against the camera's depth map when given, else against a z-buffer of the
    points themselves (a point is visible if its depth is within ``occlusion_tol`` (relative) of the
    nearest depth at its pixel).

    Args:
        points: [N, 3]; images: [C, H, W, 3] in [0, 1]; Ks: [C, 3, 3];
        camtoworlds: [C, 4, 4] OpenCV camera-to-(points' frame); sky_masks: [C, H, W] bool;
        depths: [C, H, W] z-depth, 0 = unknown.
    Returns:
        colors [N, 3] (zeros where unseen) and seen [N] bool.
    """
    C, H, W, _ = images.shape
    uv, z = project_points(points, Ks, invert_rigid(camtoworlds))
    colors = torch.zeros_like(points)
    seen = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    for c in range(C):
        ix, iy = uv[c, :, 0].floor().long(), uv[c, :, 1].floor().long()
        ok = (z[c] > 0.1) & (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H) & ~seen
        ixc, iyc = ix.clamp(0, W - 1), iy.clamp(0, H - 1)
        ref = depths[c] if depths is not None else None
        if ref is None or not (ref > 0).any():
            ref = zbuffer(uv[c], z[c], W, H)
        near = ref[iyc, ixc]
        ok &= (z[c] <= near * (1 + occlusion_tol)) | ~torch.isfinite(near) | (near <= 0)
        if sky_masks is not None:
            ok &= ~sky_masks[c][iyc, ixc]
        colors[ok] = images[c][iyc[ok], ixc[ok]]
        seen |= ok
    return colors, seen


def voxel_downsample(
    points: torch.Tensor, colors: torch.Tensor, voxel_size: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average points and colours per voxel of ``voxel_size`` metres. [N, 3] -> [M, 3]."""
    p, c, _ = voxel_downsample_frames(points, colors, None, voxel_size)
    return p, c


def voxel_downsample_frames(
    points: torch.Tensor, colors: torch.Tensor, frame_ids: torch.Tensor | None, voxel_size: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`voxel_downsample` that also keeps a frame index per voxel: ``frame_ids`` [N] long ->
    [M], the earliest frame among the voxel's points (None in, None out). A moving car's points of
    different frames lie in different voxels except where its surfaces overlap between frames, so
    the kept frame places the voxel's point to within a voxel of where that frame saw it."""
    if voxel_size <= 0 or points.shape[0] == 0:
        return points, colors, frame_ids
    keys = torch.floor((points - points.min(0).values) / voxel_size).long()
    _, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    M = counts.shape[0]
    out_p = torch.zeros(M, 3, dtype=points.dtype, device=points.device).index_add_(0, inverse, points)
    out_c = torch.zeros(M, 3, dtype=colors.dtype, device=colors.device).index_add_(0, inverse, colors)
    denom = counts.to(points.dtype)[:, None]
    out_f = None
    if frame_ids is not None:
        big = torch.iinfo(torch.long).max
        out_f = torch.full((M,), big, dtype=torch.long, device=points.device).scatter_reduce_(
            0, inverse, frame_ids.to(points.device, torch.long), reduce="amin")
    return out_p / denom, out_c / denom, out_f


def sparse_voxel_mask(points: torch.Tensor, cell: float, min_points: int) -> torch.Tensor:
    """[N] bool: points whose ``cell``-sized voxel holds at least ``min_points`` points (drops strays)."""
    if points.shape[0] == 0 or min_points <= 1:
        return torch.ones(points.shape[0], dtype=torch.bool, device=points.device)
    keys = torch.floor((points - points.min(0).values) / cell).long()
    _, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    return counts[inverse] >= min_points


def statistical_outlier_mask(points: torch.Tensor, nb_neighbors: int, std_ratio: float) -> torch.Tensor:
    """[N] bool inliers by open3d's statistical outlier removal (mean k-NN distance test).

    open3d's KD-tree is much faster than a torch k-NN on large clouds; imported lazily because the
    GPU machine has no open3d.
    """
    import open3d as o3d

    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.detach().cpu().double().numpy()))
    _, idx = pcd.remove_statistical_outlier(nb_neighbors=nb_neighbors, std_ratio=std_ratio)
    mask = torch.zeros(points.shape[0], dtype=torch.bool)
    mask[torch.as_tensor(idx, dtype=torch.long)] = True
    return mask.to(points.device)


def points_in_box(points: torch.Tensor, box_to_frame: torch.Tensor, size: torch.Tensor, margin: float = 0.1):
    """Points inside an oriented box.

    Args:
        points: [N, 3] in some frame F; box_to_frame: [4, 4] box-centre pose in F (x along length l,
            y along width w, z up); size: [3] (l, w, h) metres.
    Returns:
        inside [N] bool and local [N, 3] coordinates in the box frame.
    """
    T = invert_rigid(box_to_frame)
    local = points @ T[:3, :3].T + T[:3, 3]
    inside = (local.abs() <= size / 2 + margin).all(dim=-1)
    return inside, local
