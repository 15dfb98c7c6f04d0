"""Moving objects without box tracks: discovered from flow that ego-motion does not explain.

For a segment whose data has no ``instances/instances_info.json`` but has depth and optical flow,
stage 2 finds the moving objects itself, once per segment (when the segment's state is built).
The flow is the dataset's ``flow/`` when present, else the processor's RAFT when it is trusted
(real ``optical_flow_weights``); an untrusted RAFT is refused (random weights never create
objects) and the report says why.

1. **Ego flow** (:func:`ego_flow`): the flow a static world would produce, from camera t's depth
   and the two camera poses. A pixel moves on its own (:func:`moving_pixels`) where the observed
   flow differs from it by more than ``discovery_residual_px`` (and ``discovery_residual_rel`` of
   the ego flow's length), or where its surface point, found again at t+1 through the flow and
   that frame's depth, moved more than ``discovery_motion_m`` in the segment frame (motion along
   the viewing ray barely moves a pixel, so a car straight ahead needs this depth test). The depth
   test runs only where both depths are smooth (``discovery_depth_edge``), compares the static
   prediction with the range of the t+1 depths around the flow target, and rejects a motion
   that camera t already saw in place (an occlusion at t+1) or above ``discovery_max_motion_m``.
   A pixel only the depth test found counts as a moving surface at t+1, not at t (a static point
   a moving car covers at t+1 passes the test too).
2. **Clusters** (:func:`cluster_points`): each frame's moving points, all cameras together, lifted
   to the segment frame, above the local ground plus ``discovery_ground_clearance``, split into
   connected components of a voxel grid of ``discovery_cluster_radius``; fewer than
   ``discovery_min_points`` points is noise. Touching fragments of one object join
   (:func:`join_fragments`: within ``discovery_join_gap_m``, the union fitting
   ``discovery_object_max_length_m`` x ``discovery_object_max_width_m``).
3. **Tracks** (:func:`track_clusters`): clusters associated frame to frame by their centres
   (constant-velocity prediction, greedy nearest first within ``discovery_gate_m``); a track unseen
   for up to ``tracking_memory_length`` frames can still be re-associated, after that it ends.
   Tracks that stay within ``discovery_merge_m`` of each other on every shared frame are parts of
   one object (:func:`merge_tracks`).
4. **Pseudo-boxes** (:func:`pseudo_boxes`): the point cloud's points of the same frame connected
   to a track's moving points complete its shape (:func:`complete_with_cloud`); per track, the
   heading from one robust polynomial fit of its whole centre path (``discovery_heading_degree``),
   one size from its points' robust extents, the box floor on the ground and the box anchored at
   the faces the sensors saw (the far side is where the size says); a box centre more than
   ``discovery_centre_outlier_m`` off that path is replaced by it. Frames inside a gap of at most ``tracking_memory_length`` are interpolated;
   tracks seen on fewer than ``discovery_min_track_frames`` frames or moving at most
   ``discovery_motion_threshold`` metres are dropped (parked cars stay static, as with box tracks).

The pseudo-box tracks then split the segment's point cloud with the same rule as box tracks
(:func:`evolsplat_ns.data.actors.split_point_cloud`), and the actors train and are refined as if
the data had boxes. Frames: the segment frame (z up), OpenCV cameras, pixel centres at
(j + 0.5, i + 0.5), flow in pixels t -> t+1 (see :mod:`evolsplat_ns.model.stage2.aggregate`).

Limits: rigid objects only; two objects closer than about one cluster radius merge; an object that
stops is lost while it stands still (and comes back as a new track if it stands for longer than
the memory); sizes are what the cameras saw (a car only ever seen from behind gets a short box).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch
import torch.nn.functional as F

from evolsplat_ns.data.actors import ActorTrack
from evolsplat_ns.data.observations import SegmentObservations
from evolsplat_ns.model.stage2.aggregate import lift
from evolsplat_ns.model.stage2.config import Stage2Config


class FlowModel(Protocol):
    """An optical-flow estimator as :class:`~evolsplat_ns.model.stage2.perception.RaftFlow` is one:
    ``trusted`` (real weights), and images [H, W, 3] in [0, 1] (t, t+1) -> flow [H, W, 2] pixels."""

    trusted: bool

    def __call__(self, image0: torch.Tensor, image1: torch.Tensor) -> torch.Tensor: ...


@dataclass
class DiscoveryReport:
    """What discovery did on one segment.

    Attributes:
        objects_from: "flow discovery" when it found objects, else "none (why)".
        tracks: the kept tracks' ids; dropped: tracks dropped per reason (short, static).
        moving_pixels: pixels found moving over all pairs and cameras; clusters: clusters over all frames.
        flow_source: the flow it ran on: "dataset", the RAFT variant (trusted), or "none (why)".
    """

    objects_from: str
    tracks: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    moving_pixels: int = 0
    clusters: int = 0
    flow_source: str = "none"


# -- 1. moving pixels ------------------------------------------------------------------------------


def _pixel_grid(H: int, W: int, device, dtype) -> torch.Tensor:
    """[H, W, 2] pixel centres (u = column + 0.5, v = row + 0.5)."""
    v, u = torch.meshgrid(torch.arange(H, device=device, dtype=dtype), torch.arange(W, device=device, dtype=dtype),
                          indexing="ij")
    return torch.stack([u, v], -1) + 0.5


def _project(X: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates [n, 2] and z-depth [n] of segment-frame points ``X`` [n, 3] in an OpenCV
    camera (``K`` [3, 3], camera-to-segment ``c2w`` [4, 4])."""
    w2c = torch.linalg.inv(c2w)
    cam = X @ w2c[:3, :3].T + w2c[:3, 3]
    z = cam[:, 2]
    pix = cam @ K.T
    return pix[:, :2] / z.clamp(min=1e-6)[:, None], z


def ego_flow(depth: torch.Tensor, K: torch.Tensor, c2w_t: torch.Tensor, c2w_t1: torch.Tensor) -> torch.Tensor:
    """[H, W, 2] flow t -> t+1 (pixels) of a static world: each pixel of camera t lifted with its
    z-depth ``depth`` [H, W] (0 = unknown) into the segment frame, projected into camera t+1.

    ``K`` [3, 3]; ``c2w_t``, ``c2w_t1`` [4, 4] OpenCV camera-to-segment. Pixels without depth, or
    whose point falls behind camera t+1, get 0 (and are never judged moving)."""
    H, W = depth.shape
    dtype = torch.float64
    uv = _pixel_grid(H, W, depth.device, dtype).reshape(-1, 2)
    X = lift(uv, depth.reshape(-1).to(dtype), K.to(dtype), c2w_t.to(dtype))
    uv1, z1 = _project(X, K.to(dtype), c2w_t1.to(dtype))
    ok = (depth.reshape(-1) > 0) & (z1 > 1e-3)
    out = torch.where(ok[:, None], uv1 - uv, torch.zeros_like(uv))
    return out.reshape(H, W, 2).to(torch.float32)


def residual_motion_mask(flow: torch.Tensor, ego: torch.Tensor, depth: torch.Tensor, thresh_px: float,
                         rel: float) -> torch.Tensor:
    """[H, W] bool: pixels with depth whose flow ``flow`` [H, W, 2] differs from the ego flow ``ego``
    [H, W, 2] by more than ``thresh_px`` pixels and more than ``rel`` times the ego flow's length
    (flow errors grow with the flow)."""
    residual = (flow.to(ego.dtype) - ego).norm(dim=-1)
    return (depth > 0) & (residual > thresh_px) & (residual > rel * ego.norm(dim=-1))


def _neighbours4(image: torch.Tensor, uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values [n, 4] of ``image`` [H, W] at the four pixels around ``uv`` [n, 2] (centres at
    +0.5) and their centres [n, 4, 2]; 0 outside the image."""
    H, W = image.shape
    x0, y0 = (uv[:, 0] - 0.5).floor().long(), (uv[:, 1] - 0.5).floor().long()
    vals, centres = [], []
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
            v = image[yi.clamp(0, H - 1), xi.clamp(0, W - 1)].to(uv.dtype)
            vals.append(torch.where(inside, v, torch.zeros_like(v)))
            centres.append(torch.stack([xi, yi], -1).to(uv.dtype) + 0.5)
    return torch.stack(vals, -1), torch.stack(centres, 1)


def _depth_candidates(depth: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """[n, 5] depths around pixel coordinates ``uv`` [n, 2] of ``depth`` [H, W]: bilinear (0 unless
    all four neighbours are known) and the four neighbours' own (0 = unknown or outside)."""
    d4, centres = _neighbours4(depth, uv)
    f = (uv - centres[:, 0]).clamp(0, 1)
    bilinear = ((d4[:, 0] * (1 - f[:, 0]) + d4[:, 1] * f[:, 0]) * (1 - f[:, 1])
                + (d4[:, 2] * (1 - f[:, 0]) + d4[:, 3] * f[:, 0]) * f[:, 1])
    return torch.cat([torch.where((d4 > 0).all(-1), bilinear, torch.zeros_like(bilinear))[:, None], d4], -1)


def smooth_depth(depth: torch.Tensor, edge: float) -> torch.Tensor:
    """[H, W] bool: pixels whose 3x3 neighbourhood of ``depth`` [H, W] is all known and within a
    factor ``1 + edge`` (max / min): not on a depth edge or a surface seen at a grazing angle."""
    d = depth[None, None].double()
    hi = F.max_pool2d(d, 3, 1, 1)[0, 0]
    lo = -F.max_pool2d(-torch.where(d > 0, d, torch.zeros_like(d)), 3, 1, 1)[0, 0]
    return (lo > 0) & (hi <= (1 + edge) * lo)


def scene_flow(flow: torch.Tensor, depth_t: torch.Tensor, depth_t1: torch.Tensor, K: torch.Tensor,
               c2w_t: torch.Tensor, c2w_t1: torch.Tensor, edge: float = 0.05
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segment-frame motion of each pixel's surface point between t and t+1.

    The pixel's point at t is lifted with ``depth_t``; at t+1 it is the flow target ``q = p +
    flow`` lifted with the depth at t+1 interpolated at q. Only where both depths are smooth (the
    pixel's 3x3 neighbourhood at t and q's four neighbours at t+1 agree within a factor ``1 +
    edge``): at a depth edge or a thin structure the interpolated depth mixes two surfaces.

    Args: flow [H, W, 2] px; depths [H, W] (0 = unknown); K [3, 3]; c2w_t, c2w_t1 [4, 4] OpenCV
        camera-to-segment.
    The depth the static world predicts at t+1 (the point X_t seen from camera t+1) is compared with
    the *range* of the four depths around q, not with their bilinear mix: at full resolution a far
    or slanted surface's neighbouring depths differ by metres while staying within ``edge``, and
    the bilinear mix of a surface whose depth is not linear in the pixel coordinates misses a static
    point by more than a car's motion per frame (measured: 0.3–0.8 m at 100–140 m, 960x640).

    Returns: X_t [H, W, 3] (segment frame), motion [H, W, 3] (X_t1 − X_t, metres), ok [H, W] bool,
    and gap [H, W] (m): how far the static prediction's z-depth lies outside [min, max] of the
    four depths around q at t+1 (0 inside; what motion along the viewing ray shows as).
    """
    H, W = depth_t.shape
    dtype = torch.float64
    p = _pixel_grid(H, W, depth_t.device, dtype).reshape(-1, 2)
    q = p + flow.reshape(-1, 2).to(dtype)
    Kd = K.to(dtype)
    X_t = lift(p, depth_t.reshape(-1).to(dtype), Kd, c2w_t.to(dtype))
    d = _depth_candidates(depth_t1, q)  # [n, 5]: bilinear, then the four neighbours
    X_t1 = lift(q, d[:, 0], Kd, c2w_t1.to(dtype))
    d4 = d[:, 1:]
    smooth_t1 = (d4.min(-1).values > 0) & (d4.max(-1).values <= (1 + edge) * d4.min(-1).values)
    ok = smooth_depth(depth_t, edge).reshape(-1) & smooth_t1
    _, z_static = _project(X_t, Kd, c2w_t1.to(dtype))
    gap = (d4.min(-1).values - z_static).clamp(min=0) + (z_static - d4.max(-1).values).clamp(min=0)
    return X_t.reshape(H, W, 3), (X_t1 - X_t).reshape(H, W, 3), ok.reshape(H, W), gap.reshape(H, W)


def depth_gap(X: torch.Tensor, depth: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
    """[n] how far (m, along the ray) segment-frame points ``X`` [n, 3] are from the surface a
    camera (``depth`` [H, W], ``K``, OpenCV camera-to-segment ``c2w``) saw where they project: the
    smallest |d − z| over the depths around the pixel (inf outside the image or without depth)."""
    dtype = torch.float64
    uv, z = _project(X.to(dtype), K.to(dtype), c2w.to(dtype))
    d = _depth_candidates(depth, uv)
    gap = (d - z[:, None]).abs().masked_fill(d <= 0, float("inf")).min(-1).values
    return torch.where(z > 1e-3, gap, torch.full_like(gap, float("inf")))


def moving_pixels(flow: torch.Tensor, depth_t: torch.Tensor, depth_t1: torch.Tensor, K: torch.Tensor,
                  c2w_t: torch.Tensor, c2w_t1: torch.Tensor, config: Stage2Config
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels of camera t that move on their own between t and t+1 (see the module docstring).

    Returns: mask [H, W] bool, X_t [H, W, 3] the pixels' segment-frame points at t, X_t1
    [H, W, 3] the same surface points at t+1 (found through the flow and depth at t+1; NaN where
    that depth is unknown or across a depth edge), and depth_only [H, W] bool: the part of
    ``mask`` that only the depth test found. A static point that a *moving* object covers at t+1
    passes that test too (the occluder was elsewhere at t, so the occlusion check cannot see it):
    its X_t is background, but its X_t1 is the occluder's surface at t+1. So the depth-only
    pixels are evidence of a moving surface at t+1 (X_t1), not at t (see :func:`discover_objects`)."""
    c = config
    ego = ego_flow(depth_t, K, c2w_t, c2w_t1)
    by_flow = residual_motion_mask(flow, ego, depth_t, c.discovery_residual_px, c.discovery_residual_rel)
    X_t, motion, ok, gap = scene_flow(flow, depth_t, depth_t1, K, c2w_t, c2w_t1, c.discovery_depth_edge)
    dist = motion.norm(dim=-1)
    by_depth = ok & (dist > c.discovery_motion_m) & (gap > c.discovery_motion_m)
    if bool(by_depth.any()):
        # a point that is hidden at t+1 reads its occluder's depth there; if that occluder's point
        # was already at its place at t (camera t saw it), the world did not move: an occlusion
        X_t1 = (X_t + motion)[by_depth]
        by_depth[by_depth.clone()] = depth_gap(X_t1, depth_t, K, c2w_t) > c.discovery_motion_m
    implausible = ok & (dist > c.discovery_max_motion_m)  # an occlusion at t+1, not a motion
    mask = (by_flow | by_depth) & ~implausible
    X_t1 = torch.where(ok[..., None], X_t + motion, torch.full_like(X_t, float("nan")))
    return mask, X_t.float(), X_t1.float(), mask & ~by_flow


def ground_height(points: torch.Tensor, centre: torch.Tensor, radius: float = 20.0) -> Optional[float]:
    """Ground z (segment frame) near ``centre`` [3] from static points [n, 3]: the 10th percentile
    of the z of points within ``radius`` m horizontally (the road is the lowest large surface)."""
    near = points[(points[:, :2] - centre[:2]).norm(dim=-1) < radius]
    if near.shape[0] < 20:
        return None
    return float(torch.quantile(near[:, 2].double(), 0.1))


# -- 2. clusters -----------------------------------------------------------------------------------


def cluster_points(points: torch.Tensor, radius: float, min_points: int) -> torch.Tensor:
    """[N] long cluster label of each point [N, 3] (-1: in a cluster of fewer than ``min_points``).

    Connected components of the occupied cells of a voxel grid of edge ``radius``: two cells are
    connected when they touch (26-neighbourhood), so points closer than ``radius`` always share a
    cluster and points farther than ``2·sqrt(3)·radius`` never do directly. Deterministic: labels
    0, 1, ... in the order of each cluster's smallest cell (lexicographic x, y, z).
    """
    N = points.shape[0]
    labels = torch.full((N,), -1, dtype=torch.long, device=points.device)
    if N == 0:
        return labels
    keys = torch.floor((points - points.min(0).values) / radius).long()
    cells, inverse = torch.unique(keys, dim=0, return_inverse=True)  # sorted lexicographically
    dims = cells.max(0).values + 3

    def code(k: torch.Tensor) -> torch.Tensor:  # monotone in the lexicographic order of k + 1
        return ((k[:, 0] + 1) * dims[1] + (k[:, 1] + 1)) * dims[2] + (k[:, 2] + 1)

    codes = code(cells)
    V = cells.shape[0]
    src, dst = [], []
    for o in torch.cartesian_prod(*[torch.tensor([-1, 0, 1], device=points.device)] * 3):
        if bool((o == 0).all()):
            continue
        c = code(cells + o)
        j = torch.searchsorted(codes, c).clamp(max=V - 1)
        hit = codes[j] == c
        src.append(torch.arange(V, device=points.device)[hit])
        dst.append(j[hit])
    src_t, dst_t = torch.cat(src), torch.cat(dst)
    comp = torch.arange(V, device=points.device)
    while True:  # min-label propagation with pointer jumping
        new = comp.scatter_reduce(0, src_t, comp[dst_t], reduce="amin")
        new = new[new]
        if torch.equal(new, comp):
            break
        comp = new
    roots, cell_label = torch.unique(comp, return_inverse=True)  # roots sorted: by smallest cell
    point_label = cell_label[inverse]
    counts = torch.bincount(point_label, minlength=roots.numel())
    big = counts >= min_points
    remap = torch.full((roots.numel(),), -1, dtype=torch.long, device=points.device)
    remap[big] = torch.arange(int(big.sum()), device=points.device)
    return remap[point_label]


def join_fragments(groups: list[torch.Tensor], max_length: float, max_width: float, max_gap: float,
                   step_deg: float = 5.0, sample: int = 2048) -> list[torch.Tensor]:
    """Join one frame's clusters (each [n_k, 3], segment frame, z up) that are fragments of one
    object: greedily, closest centres first (horizontally; ties by index), two clusters become one
    when their closest points are less than ``max_gap`` m apart and the union's horizontal
    footprint fits a ``max_length`` x ``max_width`` m rectangle in some orientation (every
    ``step_deg`` degrees). At full resolution a car's faces seen at a distance (front, bonnet,
    roof, side) fall into separate clusters where the grazing parts between them are not found
    moving. One behind the other (union longer than two cars) never fits; two cars side by side
    in adjacent lanes are more than ``max_gap`` apart (3.5 m lanes, 1.9 m cars: 1.6 m), which the
    footprint alone would miss (a rear face next to a front face fits a car seen crosswise).
    The gap is measured on at most ``sample`` points per cluster (an even stride). Deterministic;
    order of the result: by each joined group's first member."""
    if len(groups) < 2:
        return groups
    a = torch.deg2rad(torch.arange(0.0, 180.0, step_deg, dtype=torch.float64))
    dirs = torch.stack([torch.stack([a.cos(), a.sin()]), torch.stack([-a.sin(), a.cos()])])  # [2 (u, v), 2, A]
    lo, hi = [], []  # per group [2, A]: the smallest / largest projection on u and v at each angle
    for g in groups:
        proj = torch.einsum("nd,kda->kna", g[:, :2].double().cpu(), dirs)
        lo.append(proj.min(1).values)
        hi.append(proj.max(1).values)
    centres = torch.stack([g[:, :2].double().mean(0).cpu() for g in groups])
    few = [g[:: max(1, g.shape[0] // sample)].double().cpu() for g in groups]
    near = {(i, j): float(torch.cdist(few[i], few[j]).min()) < max_gap
            for i in range(len(groups)) for j in range(i + 1, len(groups))}
    members = [[k] for k in range(len(groups))]
    alive = list(range(len(groups)))
    merged = True
    while merged:
        merged = False
        pairs = sorted(((float((centres[i] - centres[j]).norm()), i, j) for x, i in enumerate(alive) for j in alive[x + 1:]))
        for _, i, j in pairs:
            ext = torch.maximum(hi[i], hi[j]) - torch.minimum(lo[i], lo[j])  # [2, A]
            touch = any(near[min(a, b), max(a, b)] for a in members[i] for b in members[j])
            if touch and bool(((ext[0] <= max_length) & (ext[1] <= max_width)).any()):
                lo[i], hi[i] = torch.minimum(lo[i], lo[j]), torch.maximum(hi[i], hi[j])
                n_i, n_j = sum(groups[k].shape[0] for k in members[i]), sum(groups[k].shape[0] for k in members[j])
                centres[i] = (n_i * centres[i] + n_j * centres[j]) / (n_i + n_j)
                members[i] += members[j]
                alive.remove(j)
                merged = True
                break
    return [torch.cat([groups[k] for k in sorted(members[i])]) for i in alive]


# -- 3. tracks -------------------------------------------------------------------------------------


def track_clusters(frames: list[int], centres: list[torch.Tensor], memory: int, gate: float) -> list[torch.Tensor]:
    """Identities of clusters over frames.

    Args:
        frames: ascending scene frames; centres: per frame, [C_t, 3] cluster centres (segment frame).
        memory: a track unseen for up to this many frames (scene frames, so a held-out frame
            counts) can still be re-associated; after that it ends and a new cluster starts a new track.
        gate: largest distance (m, horizontal) between a track's predicted centre (constant velocity
            from its last two observations; its last centre with one) and a cluster it takes.
    Returns:
        per frame, [C_t] long track ids (0, 1, ... in order of first appearance).
    Association is greedy, nearest pair first (ties by track, then cluster index): deterministic.
    """
    tracks: list[list[tuple[int, torch.Tensor]]] = []  # per track: (frame, centre) observations
    out: list[torch.Tensor] = []
    for t, C in zip(frames, centres):
        C = C.double().cpu()
        ids = torch.full((C.shape[0],), -1, dtype=torch.long)
        live = [k for k, obs in enumerate(tracks) if t - obs[-1][0] - 1 <= memory]
        if live and C.shape[0]:
            pred = torch.stack([_predict(tracks[k], t) for k in live])
            dist = torch.cdist(pred[:, :2], C[:, :2])  # [L, C_t]
            order = torch.argsort(dist.reshape(-1), stable=True)
            used_t, used_c = set(), set()
            for flat in order.tolist():
                a, b = divmod(flat, C.shape[0])
                if float(dist[a, b]) > gate:
                    break
                if a in used_t or b in used_c:
                    continue
                used_t.add(a)
                used_c.add(b)
                ids[b] = live[a]
        for b in range(C.shape[0]):
            if ids[b] < 0:
                ids[b] = len(tracks)
                tracks.append([])
            tracks[int(ids[b])].append((t, C[b]))
        out.append(ids)
    return out


def _predict(obs: list[tuple[int, torch.Tensor]], t: int) -> torch.Tensor:
    """Constant-velocity prediction at frame ``t`` from a track's last two observations."""
    t1, c1 = obs[-1]
    if len(obs) < 2:
        return c1
    t0, c0 = obs[-2]
    return c1 + (c1 - c0) / (t1 - t0) * (t - t1)


# -- 4. pseudo-boxes -------------------------------------------------------------------------------


@dataclass
class TrackObservations:
    """One discovered identity: per observed frame its moving points [n, 3] (segment frame), the
    mean camera centre [3] that saw them and the ground height (None: unknown)."""

    points: dict[int, torch.Tensor] = field(default_factory=dict)
    camera: dict[int, torch.Tensor] = field(default_factory=dict)
    ground: dict[int, Optional[float]] = field(default_factory=dict)


def _rot_z(a: float) -> torch.Tensor:
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _robust_poly(times: torch.Tensor, values: torch.Tensor, degree: int, huber_m: float = 0.2,
                 iterations: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A polynomial in time of degree ``degree`` (1 when fewer than 3·degree observations) fitted
    to ``values`` [n, d] (m) at ``times`` [n], robustly (Huber weights, ``huber_m``, by iterated
    reweighting): (fitted values [n, d], their time derivatives [n, d] per frame)."""
    n = times.numel()
    deg = degree if n >= 3 * degree else 1
    scale = max(float(times.std()) if n > 1 else 1.0, 1e-9)
    s = (times - times.mean()) / scale
    A = torch.stack([s ** k for k in range(deg + 1)], -1)  # [n, deg + 1]
    w = torch.ones(n, dtype=torch.float64)
    for _ in range(iterations):
        sw = w.sqrt()[:, None]
        coef = torch.linalg.lstsq(A * sw, values * sw).solution  # [deg + 1, d]
        r = (A @ coef - values).norm(dim=-1)
        w = (huber_m / r.clamp(min=huber_m)).clamp(max=1.0)
    dA = torch.stack([k * s ** (k - 1) if k else torch.zeros_like(s) for k in range(deg + 1)], -1) / scale
    return A @ coef, dA @ coef


def _headings(times: torch.Tensor, centres: torch.Tensor, degree: int) -> torch.Tensor:
    """[n] heading (rad, about z) per observation: the direction of the velocity of one robust
    polynomial in time (:func:`_robust_poly`, ``degree``) fitted to the whole track's centres [n, 2].

    One fit over the whole track, not a line through a few neighbours: a car entering or leaving
    the view, or half hidden, has a centroid that lags its motion for a frame or two (measured at
    960x640: a 23° swing of a ±2-frame fit where a car leaves the side of the view), and a heading
    that follows each centroid's jitter would turn the box on a car driving straight."""
    _, v = _robust_poly(times, centres, degree)
    return torch.atan2(v[:, 1], v[:, 0])


def _extent(x: torch.Tensor) -> tuple[float, float]:
    """Robust (2nd, 98th percentile) range of values [n]."""
    q = torch.quantile(x, torch.tensor([0.02, 0.98], dtype=x.dtype))
    return float(q[0]), float(q[1])


def _anchored(lo: float, hi: float, size: float, cam: float) -> float:
    """Centre along one box axis of a box of ``size`` whose seen points span [lo, hi]: anchored at
    the side facing the camera (at coordinate ``cam`` on that axis), the far side where the size says."""
    if hi - lo >= size:
        return 0.5 * (lo + hi)
    if cam <= lo:
        return lo + 0.5 * size
    if cam >= hi:
        return hi - 0.5 * size
    return 0.5 * (lo + hi)


def pseudo_boxes(tracks: dict[str, TrackObservations], frames: list[int], config: Stage2Config
                 ) -> tuple[dict[str, ActorTrack], dict[str, int]]:
    """Box tracks (object-to-segment, the box frame as for box tracks: x along the heading, z up)
    of discovered identities over the segment's ``frames``, and the count of dropped tracks per
    reason (``short``: fewer than ``discovery_min_track_frames`` observed frames; ``static``: its
    centre moved at most ``discovery_motion_threshold`` m)."""
    c = config
    out: dict[str, ActorTrack] = {}
    dropped = {"short": 0, "static": 0}
    col = {t: i for i, t in enumerate(frames)}
    for track_id, tr in tracks.items():
        seen = sorted(t for t in tr.points if t in col)
        if len(seen) < c.discovery_min_track_frames:
            dropped["short"] += 1
            continue
        times = torch.tensor(seen, dtype=torch.float64)
        centres = torch.stack([tr.points[t].double().mean(0) for t in seen])
        if float((centres.max(0).values - centres.min(0).values)[:2].norm()) <= c.discovery_motion_threshold:
            dropped["static"] += 1
            continue
        heading = _headings(times, centres[:, :2], c.discovery_heading_degree)
        lo_hi = []  # per frame: ([lo, hi] x, y in the heading frame about the centroid, z)
        for i, t in enumerate(seen):
            R = _rot_z(float(heading[i]))
            local = (tr.points[t].double() - centres[i]) @ R
            lo_hi.append([_extent(local[:, a]) for a in range(3)])
        floor_top = []  # per frame: box floor (the ground where known) and the top of the points
        for i, t in enumerate(seen):
            z0 = float(centres[i, 2])
            ground = tr.ground.get(t)
            floor_top.append((ground if ground is not None else z0 + lo_hi[i][2][0], z0 + lo_hi[i][2][1]))
        ext = torch.tensor([[e[0][1] - e[0][0], e[1][1] - e[1][0], top - floor]
                            for e, (floor, top) in zip(lo_hi, floor_top)], dtype=torch.float64)  # [n, 3]
        size = torch.quantile(ext, 0.8, dim=0)  # one size per track: the well-seen frames' extents
        size[0] = max(float(size[0]), float(size[1]))  # a vehicle is at least as long as it is wide
        poses = torch.eye(4, dtype=torch.float64).repeat(len(frames), 1, 1)
        valid = torch.zeros(len(frames), dtype=torch.bool)
        for i, t in enumerate(seen):
            R = _rot_z(float(heading[i]))
            cam = (tr.camera[t].double() - centres[i]) @ R
            (xl, xh), (yl, yh), _ = lo_hi[i]
            local_c = torch.tensor([_anchored(xl, xh, float(size[0]), float(cam[0])),
                                    _anchored(yl, yh, float(size[1]), float(cam[1])), 0.0], dtype=torch.float64)
            centre = centres[i] + R @ local_c
            centre[2] = floor_top[i][0] + 0.5 * float(size[2])
            poses[col[t], :3, :3], poses[col[t], :3, 3] = R, centre
            valid[col[t]] = True
        _replace_outliers(poses, [col[t] for t in seen], times, c.discovery_centre_outlier_m, c.discovery_heading_degree)
        _fill_gaps(poses, valid, frames, c.tracking_memory_length)
        out[track_id] = ActorTrack(track_id, size.float(), torch.tensor(frames, dtype=torch.long), poses.float(), valid)
    return out, dropped


def _replace_outliers(poses: torch.Tensor, rows: list[int], times: torch.Tensor, outlier_m: float,
                      degree: int) -> None:
    """Replace (in place) the horizontal centre of the box ``poses`` [F, 4, 4] at ``rows`` (observed at
    ``times``) that lie more than ``outlier_m`` from the track's robust motion polynomial (degree
    ``degree``, as its heading) through all of them by that polynomial's value: a car leaving the view at the side of a camera shows only the
    part still inside, whose extent is cut by the image border, not by the car's far side, so its
    anchored box slides back along the car (measured at 320x240: 1.7 m on the last frame)."""
    if len(rows) < 4:
        return
    xy = poses[rows, :2, 3].double()
    fit, _ = _robust_poly(times, xy, degree)
    bad = (xy - fit).norm(dim=-1) > outlier_m
    for r, b, f in zip(rows, bad.tolist(), fit):
        if b:
            poses[r, :2, 3] = f.to(poses.dtype)


def _fill_gaps(poses: torch.Tensor, valid: torch.Tensor, frames: list[int], memory: int) -> None:
    """Interpolate (linear centre, heading) the frames of gaps of at most ``memory`` scene frames
    between two observed frames, in place."""
    idx = valid.nonzero()[:, 0].tolist()
    for a, b in zip(idx[:-1], idx[1:]):
        if b - a < 2 or frames[b] - frames[a] - 1 > memory:
            continue
        ya = math.atan2(float(poses[a, 1, 0]), float(poses[a, 0, 0]))
        yb = math.atan2(float(poses[b, 1, 0]), float(poses[b, 0, 0]))
        dyaw = math.atan2(math.sin(yb - ya), math.cos(yb - ya))
        for i in range(a + 1, b):
            w = (frames[i] - frames[a]) / (frames[b] - frames[a])
            poses[i, :3, :3] = _rot_z(ya + w * dyaw)
            poses[i, :3, 3] = (1 - w) * poses[a, :3, 3] + w * poses[b, :3, 3]
            valid[i] = True


def merge_tracks(tracks: dict[str, TrackObservations], merge_m: float) -> dict[str, TrackObservations]:
    """Join tracks that are parts of one object: seen together on at least one frame and, on every
    frame both are seen, with centres less than ``merge_m`` apart horizontally (a car's rear face
    and roof can fall into two clusters; two cars passing each other are close on a frame or two,
    not on all). Union-find; the merged track keeps the first id (in ``tracks``' order)."""
    ids = list(tracks)
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    centre = {k: {t: p.double().mean(0)[:2] for t, p in tracks[k].points.items()} for k in ids}
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            common = set(centre[ids[i]]) & set(centre[ids[j]])
            if common and all(float((centre[ids[i]][t] - centre[ids[j]][t]).norm()) < merge_m for t in common):
                parent[root(j)] = root(i)
    out: dict[str, TrackObservations] = {}
    for i, k in enumerate(ids):
        dst = out.setdefault(ids[root(i)], TrackObservations())
        for t, pts in tracks[k].points.items():
            dst.points[t] = torch.cat([dst.points[t], pts]) if t in dst.points else pts
            dst.camera[t], dst.ground[t] = tracks[k].camera[t], tracks[k].ground[t]
    return out


def complete_with_cloud(track: TrackObservations, points: torch.Tensor, frame_ids: torch.Tensor,
                        config: Stage2Config, reach: float = 5.0) -> None:
    """Add to each observed frame of ``track`` the point-cloud points of that frame (``points`` [N,
    3] segment frame, ``frame_ids`` [N]: e.g. LiDAR, which sees the sides of a car the cameras see
    from behind) that are connected to its moving points (one cluster of the clustering, within
    ``reach`` m horizontally, above the ground clearance). In place."""
    c = config
    for t, moving in list(track.points.items()):
        centre = moving.double().mean(0).to(points.device)
        sel = (frame_ids == t) & ((points[:, :2].double() - centre[:2]).norm(dim=-1) < reach)
        ground = track.ground.get(t)
        if ground is not None:
            sel &= points[:, 2] > ground + c.discovery_ground_clearance
        cand = points[sel].to(moving.dtype).cpu()
        if cand.shape[0] == 0:
            continue
        P = torch.cat([moving, cand])
        labels = cluster_points(P, c.discovery_cluster_radius, 1)
        own = torch.isin(labels[moving.shape[0]:], labels[:moving.shape[0]].unique())
        track.points[t] = torch.cat([moving, cand[own]])


# -- the whole segment -----------------------------------------------------------------------------


def discovery_flow(obs: SegmentObservations, config: Stage2Config, flow_model: Optional[FlowModel]) -> tuple[str, bool]:
    """(flow source, usable) of discovery on ``obs``: the dataset's ``flow/`` when present, else
    ``flow_model`` (RAFT) only when it is trusted; "none (why)" otherwise."""
    if obs.has_flow:
        return "dataset", True
    if flow_model is None:
        return "none (no box tracks, and no dataset flow/ to discover moving objects from)", False
    if not flow_model.trusted:
        return (f"none (no box tracks, no dataset flow/, and {config.optical_flow_model} without optical_flow_weights "
                "is untrusted: random weights never create objects)"), False
    return config.optical_flow_model, True


def _pair_flow(obs: SegmentObservations, t: int, cam: int, flow_model: Optional[FlowModel], device):
    """The pair (t, t+1) of camera ``cam`` and its flow [H, W, 2] on ``device``: the dataset's, or
    ``flow_model`` on the pair's images (only called once :func:`discovery_flow` allowed it)."""
    if obs.has_flow:
        pair = obs.pair(t, cam)
        return pair, pair.flow.to(device)
    pair = obs.pair(t, cam, images=True)
    return pair, flow_model(pair.view_t.image.to(device), pair.view_t1.image.to(device)).to(device)


def discover_objects(obs: SegmentObservations, config: Stage2Config, cloud: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                     device: torch.device | str = "cpu", flow_model: Optional[FlowModel] = None
                     ) -> tuple[dict[str, ActorTrack], DiscoveryReport]:
    """Pseudo-box tracks (segment frame, over ``obs.frames``) of the moving objects of a segment
    from its flow and depth, and a report. Needs ``obs.has_depth`` and flow: the dataset's
    (``obs.has_flow``), else ``flow_model`` (the processor's RAFT) when it is trusted; otherwise
    no tracks, and the report says why (an untrusted RAFT's random weights never create objects).

    ``cloud``: the segment's point cloud (points [N, 3] segment frame, frame ids [N]); its points
    connected to a track's moving points complete that track's shape (:func:`complete_with_cloud`)."""
    if not obs.has_depth:
        return {}, DiscoveryReport("none (no box tracks, and no depth/ to discover moving objects from flow)")
    flow_source, usable = discovery_flow(obs, config, flow_model)
    if not usable:
        return {}, DiscoveryReport(flow_source, flow_source=flow_source)
    c = config
    source: dict[int, list[torch.Tensor]] = {}  # frame -> moving points seen as flow sources (t of a pair)
    target: dict[int, list[torch.Tensor]] = {}  # frame -> moving points found as flow targets (t+1)
    arrived: dict[int, list[torch.Tensor]] = {}  # frame -> targets (t+1) of pixels only the depth test found
    cams: dict[int, list[torch.Tensor]] = {}
    static: dict[int, list[torch.Tensor]] = {}
    moving_count = 0
    for t, t1 in obs.pairs():
        for cam in obs.cameras:
            pair, flow = _pair_flow(obs, t, cam, flow_model, device)
            v0, v1 = pair.view_t, pair.view_t1
            to = lambda x: x.to(device)  # noqa: E731
            mask, X_t, X_t1, depth_only = moving_pixels(flow, to(v0.depth), to(v1.depth), to(v0.K), to(v0.c2w),
                                                        to(v1.c2w), c)
            moving_count += int(mask.sum())
            finite = torch.isfinite(X_t1).all(-1)
            source.setdefault(t, []).append(X_t[mask & ~depth_only])
            arrived.setdefault(t1, []).append(X_t1[depth_only & finite])  # see moving_pixels: a surface at t+1
            target.setdefault(t1, []).append(X_t1[mask & ~depth_only & finite])
            static.setdefault(t, []).append(X_t[(v0.depth.to(device) > 0) & ~mask][::7])
            cams.setdefault(t, []).append(v0.c2w[:3, 3].to(device))
            cams.setdefault(t1, []).append(v1.c2w[:3, 3].to(device))
    frames = list(obs.frames)
    per_frame: list[torch.Tensor] = []
    clusters_at: list[list[torch.Tensor]] = []
    ground_at: dict[int, Optional[float]] = {}
    for t in frames:
        # a frame's own flow first (the last frame: its predecessor's targets), and the depth-only
        # movers' targets from its predecessor (a depth-only mover of the first frame is found from the second on)
        pts = (source.get(t) or target.get(t) or []) + arrived.get(t, [])
        P = torch.cat(pts) if pts else torch.zeros(0, 3, device=device)
        cam_t = torch.stack(cams[t]).mean(0) if t in cams else torch.zeros(3, device=device)
        st = static.get(t) or static.get(frames[frames.index(t) - 1] if frames.index(t) > 0 else t) or []
        ground_at[t] = ground_height(torch.cat(st), cam_t) if st else None
        if ground_at[t] is not None:
            P = P[P[:, 2] > ground_at[t] + c.discovery_ground_clearance]
        labels = cluster_points(P, c.discovery_cluster_radius, c.discovery_min_points)
        groups = [P[labels == k] for k in range(int(labels.max()) + 1)] if labels.numel() else []
        groups = join_fragments(groups, c.discovery_object_max_length_m, c.discovery_object_max_width_m,
                                c.discovery_join_gap_m)
        clusters_at.append(groups)
        per_frame.append(torch.stack([g.mean(0) for g in groups]) if groups else torch.zeros(0, 3, device=device))
    ids = track_clusters(frames, per_frame, c.tracking_memory_length, c.discovery_gate_m)
    observed: dict[str, TrackObservations] = {}
    for t, groups, tid in zip(frames, clusters_at, ids):
        cam_t = torch.stack(cams[t]).mean(0).cpu() if t in cams else torch.zeros(3)
        for g, k in zip(groups, tid.tolist()):
            tr = observed.setdefault(f"flow{k}", TrackObservations())
            tr.points[t], tr.camera[t], tr.ground[t] = g.cpu(), cam_t, ground_at[t]
    observed = merge_tracks(observed, c.discovery_merge_m)
    if cloud is not None:
        for tr in observed.values():
            complete_with_cloud(tr, cloud[0].to(device), cloud[1].to(device), c)
    tracks, dropped = pseudo_boxes(observed, frames, c)
    tracks = {f"flow{i}": _renamed(tr, f"flow{i}") for i, tr in enumerate(tracks.values())}
    report = DiscoveryReport("flow discovery" if tracks else "none (no box tracks, and flow discovery found no moving object)",
                             list(tracks), dropped, moving_count, sum(len(g) for g in clusters_at), flow_source)
    return tracks, report


def _renamed(track: ActorTrack, name: str) -> ActorTrack:
    return ActorTrack(name, track.size, track.frames, track.poses, track.valid)
