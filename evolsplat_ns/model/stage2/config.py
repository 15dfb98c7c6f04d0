"""``Stage2Config``: every setting of the online stage-2 refiner (nested under the model config as
``--pipeline.model.stage2.*``; names and defaults follow the original user guide)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

Stage2Mode = Literal["joint", "gaussian_only", "pose_only"]


@dataclass
class Stage2Config:
    enabled: bool = False
    """Run stage 2 inside training (the ``evolsplat-stage2`` methods turn it on)."""
    stage2_start_epoch: int = 10
    """First epoch (one pass over the training segments: segments x iters_per_segment steps) with stage 2."""
    start_step: Optional[int] = None
    """Start at this step instead of ``stage2_start_epoch`` (None = use the epoch)."""
    stage2_frequency: int = 5
    """Run stage 2 every N iterations once started."""
    stage2_training_mode: Stage2Mode = "joint"
    """joint: both heads train; gaussian_only: poses stay the boxes, the pose head leaves the optimizer;
    pose_only: Gaussians stay stage 1's, the Gaussian head leaves the optimizer."""
    stage2_controller: str = "default"
    """Controller by name: default, memory_adaptive, epoch_phases, or one you registered
    (evolsplat_ns.engine.stage2_strategies.register_controller)."""
    stage2_loss: str = "complete"
    """The stage-2 loss: complete (Stage2CompleteLoss) or a subclass registered in the ``losses`` group."""
    stage2_memory_efficient: bool = True
    """Subsample objects to the point budget and checkpoint the attention blocks."""
    stage2_learning_rate: float = 1e-5
    """Learning rate of the ``stage2`` optimizer group (the method configs build that group from it)."""
    detach_stage1: bool = True
    """Stage-1 actor Gaussians enter stage 2 detached (stage-2 losses never reach the stage-1 actor head)."""
    max_objects_per_frame: int = 10
    """At most this many objects (the ones with most points) are refined per segment."""
    max_points_per_object: int = 2048
    """Point budget per object for the refine heads (halves after an OOM, grows back after clean runs)."""
    input_gaussian_dim: int = 14
    """Width of the Gaussian vector the heads read (layout: evolsplat_ns.model.stage2.heads, 14 only)."""
    gaussian_feature_dim: int = 128
    """Feature width of the Gaussian refine head's attention blocks."""
    gaussian_num_layers: int = 2
    """Attention blocks over an object's Gaussians."""
    gaussian_num_heads: int = 4
    """Attention heads (both refine heads)."""
    pose_feature_dim: int = 128
    """Feature width of the pose refine head (per-frame pose features and object token)."""
    pose_num_layers: int = 2
    """Temporal transformer layers of the pose refine head."""
    # -- OnlineDynamicProcessor (masks, flow, observed motion; evolsplat_ns.model.stage2.processor) ----
    use_optical_flow_aggregation: bool = True
    """Estimate each object's motion from flow + depth and fit its trajectory to boxes and flow (off:
    the boxes are the poses stage 2 starts from)."""
    optical_flow_model: Literal["raft_small", "raft_large"] = "raft_small"
    """Flow model for data without a flow/ folder (torchvision RAFT)."""
    optical_flow_weights: Optional[Path] = None
    """RAFT state-dict file; without it RAFT is untrusted and its flow is not used."""
    segmenter: Literal["box", "sam2_box"] = "box"
    """Object masks: depth-lifted pixels inside the (enlarged) boxes, or SAM2 prompted by the projected boxes."""
    sam2_model_cfg: str = "configs/sam2.1/sam2.1_hiera_t.yaml"
    """SAM2 model config name inside the sam2 package."""
    sam2_checkpoint: Optional[Path] = None
    """SAM2 checkpoint; without it SAM2 is untrusted and the box masks are used."""
    confidence_threshold: float = 0.3
    """Keep a SAM2 mask only if its predicted IoU is at least this."""
    min_mask_area: int = 100
    """Keep a SAM2 mask only with at least this many pixels."""
    mask_box_margin: float = 0.5
    """Metres a box is enlarged by (sides and top) when assigning depth-lifted pixels to it (box noise)."""
    mask_ground_clearance: float = 0.2
    """Pixels lower than this above the box floor are road, not the object."""
    min_correspondences: int = 30
    """Fewer flow + depth correspondences than this give no motion increment (the box is kept)."""
    flow_increment_sigma_m: float = 0.03
    """Noise (m) of a flow-aggregated increment's translation in the trajectory fit."""
    flow_increment_sigma_deg: float = 0.3
    """Noise (degrees) of a flow-aggregated increment's yaw in the trajectory fit."""
    motion_prior_sigma_m: float = 0.05
    """Constant-velocity prior of the trajectory fit: noise (m per frame²) of a box centre's second
    difference (0 = off: only boxes and flow). At 10 Hz, 0.05 allows 5 m/s² of acceleration."""
    motion_prior_sigma_deg: float = 0.5
    """Constant-yaw-rate prior: noise (degrees per frame²) of the heading's second difference (0 = off)."""
    # -- discovery without box tracks (evolsplat_ns.model.stage2.discovery) -----------------------
    discover_without_boxes: bool = True
    """A segment without box tracks (no instances/instances_info.json) but with depth and dataset flow:
    find its moving objects from flow that ego-motion does not explain and make pseudo-box tracks
    (off: such a segment has no actors and its moving objects train as static points)."""
    tracking_memory_length: int = 5
    """A discovered track unseen for up to this many frames keeps its identity (and the gap is
    interpolated); unseen for longer, a reappearing object starts a new track."""
    discovery_residual_px: float = 1.0
    """A pixel moves on its own where its flow differs from the ego-motion flow by more than this (px)..."""
    discovery_residual_rel: float = 0.2
    """...and by more than this fraction of the ego-motion flow's length (flow errors grow with the flow)."""
    discovery_motion_m: float = 0.25
    """...or where its surface point, found at t+1 through flow and depth, moved more than this (m per frame)."""
    discovery_depth_edge: float = 0.05
    """The depth test runs only where depths are smooth: a 3x3 neighbourhood within this factor (1 + x)."""
    discovery_max_motion_m: float = 3.0
    """Apparent motions above this (m per frame) are occlusions, not motion (30 m/s at 10 Hz)."""
    discovery_ground_clearance: float = 0.3
    """Moving points lower than this (m) above the local ground are not objects (road)."""
    discovery_cluster_radius: float = 0.5
    """Voxel edge (m) of the 3D clustering of a frame's moving points (touching cells join)."""
    discovery_min_points: int = 8
    """A cluster with fewer moving points than this (all cameras of one frame) is noise."""
    discovery_object_max_length_m: float = 6.0
    """One frame's clusters whose union's footprint fits this length (m)..."""
    discovery_object_max_width_m: float = 2.5
    """...by this width (m), in some orientation, are fragments of one object and join (a car's faces
    split at full resolution; one car behind the other never fits)..."""
    discovery_join_gap_m: float = 1.4
    """...and whose closest points are less than this apart (m; two cars in adjacent lanes are ~1.6 m apart;
    a car's faces at 50 m, 960x640, up to 1.2 m)."""
    discovery_gate_m: float = 3.0
    """Largest distance (m) between a track's constant-velocity prediction and the cluster it takes."""
    discovery_merge_m: float = 2.5
    """Tracks seen together whose centres stay closer than this (m) on every shared frame are one object."""
    discovery_heading_degree: int = 1
    """Degree of the polynomial in time fitted (robustly) to a track's whole centre path; the heading
    is its velocity's direction. 1 (default): one heading per track, measured best on the 1.2 s
    segments of the synthetic scenes (a car leaving the view drags its centroid; 2 follows it: 21°
    worst frame against 3° at 960x640); 2 follows a car turning at a steady rate in long segments."""
    discovery_centre_outlier_m: float = 0.5
    """A pseudo-box centre farther than this (m) from the track's robust motion polynomial (degree
    ``discovery_heading_degree``) through its centres is replaced by it (a car half out of the view;
    with degree 1, a speed change of up to ~3 m/s² over a 1.2 s segment stays within 0.5 m)."""
    discovery_min_track_frames: int = 3
    """Tracks observed on fewer frames than this are dropped."""
    discovery_motion_threshold: float = 0.5
    """Tracks whose centre moves at most this (m) over the segment are static and dropped (as the
    point-cloud generator's ``dynamic_motion_threshold`` does for box tracks)."""
    discovery_box_margin: float = 0.3
    """Margin (m) of the pseudo-boxes' sides and top when moving point-cloud points into the actors
    (above ``dynamic_ground_clearance``-like 0.1 m over the box floor)."""
    # -- loss weights (Stage2CompleteLoss) ------------------------------------------------------
    rgb_loss_weight: float = 0.5
    """Weight of the full-image L1 of the joint (static + refined actors) render."""
    depth_loss_weight: float = 0.05
    """Weight of the inverse-depth L1 against ground-truth depth (where the data has it)."""
    lpips_loss_weight: float = 0.05
    """Used only when LPIPS with real pretrained weights is available (else off, and said so)."""
    consistency_loss_weight: float = 0.02
    """Cross-frame consistency, warped by ground-truth or trusted flow only (else off)."""
    gaussian_reg_weight: float = 0.005
    """Weight of the Gaussian-residual regulariser."""
    pose_reg_weight: float = 0.005
    """Weight of the pose-correction regulariser."""
    temporal_smooth_weight: float = 0.002
    """Weight of the temporal smoothness of the corrected poses."""
    extra_loss_terms: dict[str, float] = field(default_factory=dict)
    """Registered loss terms (registry group ``losses``) added with these weights; see docs/stage2.md."""
