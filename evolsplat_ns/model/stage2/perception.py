"""Perception for stage 2: RAFT optical flow and SAM2 box-prompted masks, loaded from user paths.

No weights are downloaded. A model without real weights is built randomly initialised and marked
``trusted = False``: its output may feed plumbing and statistics, never a loss (masks fall back to
the projected boxes, flow terms stay off). Asking for weights at a path that does not exist is an
error naming the setting and where to get the file.

Registry groups (docs/plugins.md): ``flow_estimators`` ``raft_small`` / ``raft_large`` and
``dynamic_segmenters`` ``sam2_box`` are factories ``make(config) -> component``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F

RAFT_WEIGHTS_HINT = ("torchvision's Raft_Small_Weights / Raft_Large_Weights files (e.g. raft_small_C_T_V2-01064c6d.pth "
                     "from https://download.pytorch.org/models/), saved as a state_dict")
SAM2_CHECKPOINT_HINT = "the SAM2 checkpoints of https://github.com/facebookresearch/sam2 (e.g. sam2.1_hiera_tiny.pt)"


class WeightsNotFoundError(FileNotFoundError):
    """A weights path that was given does not exist."""


def _require_file(path: Optional[Path], setting: str, hint: str) -> Optional[Path]:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{setting}: {path} does not exist; get {hint}, or leave {setting} unset to run "
                                   "an untrusted, randomly initialised model that never supervises a loss")
    return path


@dataclass
class RaftConfig:
    optical_flow_model: Literal["raft_small", "raft_large"] = "raft_small"
    """torchvision RAFT variant."""
    optical_flow_weights: Optional[Path] = None
    """State-dict file of that variant; None = randomly initialised (untrusted)."""
    num_flow_updates: int = 0
    """Refinement iterations (0 = 6 for raft_small, 12 for raft_large)."""


class RaftFlow:
    """RAFT flow between two images [H, W, 3] in [0, 1] -> [H, W, 2] pixels (image0 -> image1)."""

    MIN_SIZE = 128  # RAFT's 4-level correlation pyramid at 1/8 resolution needs at least this

    def __init__(self, config: RaftConfig, device: str | torch.device = "cpu") -> None:
        from torchvision.models.optical_flow import raft_large, raft_small

        self.config = config
        build = {"raft_small": raft_small, "raft_large": raft_large}[config.optical_flow_model]
        self.net = build(weights=None, progress=False)
        path = _require_file(config.optical_flow_weights, "optical_flow_weights", RAFT_WEIGHTS_HINT)
        if path is not None:
            self.net.load_state_dict(torch.load(path, map_location="cpu"))
        else:
            warnings.warn(f"{config.optical_flow_model}: no optical_flow_weights given, randomly initialised "
                          "(untrusted: its flow never supervises a loss)", stacklevel=2)
        self.trusted = path is not None
        self.net.eval().to(device)
        self.updates = config.num_flow_updates or (6 if config.optical_flow_model == "raft_small" else 12)

    @torch.no_grad()
    def __call__(self, image0: torch.Tensor, image1: torch.Tensor) -> torch.Tensor:
        H, W = image0.shape[:2]
        Hp = max(self.MIN_SIZE, math.ceil(H / 8) * 8)
        Wp = max(self.MIN_SIZE, math.ceil(W / 8) * 8)

        def prep(im):
            x = im.permute(2, 0, 1)[None].float() * 2 - 1
            return F.pad(x, (0, Wp - W, 0, Hp - H), mode="replicate")

        flow = self.net(prep(image0), prep(image1), num_flow_updates=self.updates)[-1]
        return flow[0, :, :H, :W].permute(1, 2, 0)


def forward_backward_valid(flow_fw: torch.Tensor, flow_bw: torch.Tensor) -> torch.Tensor:
    """[H, W] bool: the standard forward-backward check ‖f_fw(p) + f_bw(p + f_fw(p))‖² <
    0.01 (‖f_fw‖² + ‖f_bw(p + f_fw)‖²) + 0.5 (flows [H, W, 2] in pixels)."""
    H, W = flow_fw.shape[:2]
    ii, jj = torch.meshgrid(torch.arange(H, device=flow_fw.device), torch.arange(W, device=flow_fw.device), indexing="ij")
    q = torch.stack([jj, ii], -1).to(flow_fw.dtype) + 0.5 + flow_fw
    grid = torch.stack([2 * q[..., 0] / W - 1, 2 * q[..., 1] / H - 1], -1)[None]
    bw = F.grid_sample(flow_bw.permute(2, 0, 1)[None], grid, align_corners=False)[0].permute(1, 2, 0)
    err = (flow_fw + bw).pow(2).sum(-1)
    return err < 0.01 * (flow_fw.pow(2).sum(-1) + bw.pow(2).sum(-1)) + 0.5


def make_raft_small(config: Optional[RaftConfig] = None) -> RaftFlow:
    return RaftFlow(config or RaftConfig("raft_small"))


def make_raft_large(config: Optional[RaftConfig] = None) -> RaftFlow:
    return RaftFlow(config or RaftConfig("raft_large"))


@dataclass
class Sam2Config:
    sam2_model_cfg: str = "configs/sam2.1/sam2.1_hiera_t.yaml"
    """SAM2 model config name inside the sam2 package (names differ between releases)."""
    sam2_checkpoint: Optional[Path] = None
    """SAM2 checkpoint file; None = randomly initialised (untrusted: masks fall back to projected boxes)."""
    confidence_threshold: float = 0.3
    """Keep a SAM2 mask only if its predicted IoU is at least this."""
    min_mask_area: int = 100
    """Keep a SAM2 mask only if it has at least this many pixels."""


class Sam2BoxSegmenter:
    """SAM2's image predictor prompted with each object's projected box (pixel xyxy)."""

    def __init__(self, config: Sam2Config, device: str | torch.device = "cpu") -> None:
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.config = config
        path = _require_file(config.sam2_checkpoint, "sam2_checkpoint", SAM2_CHECKPOINT_HINT)
        model = build_sam2(config.sam2_model_cfg, ckpt_path=str(path) if path else None, device=str(device))
        self.predictor = SAM2ImagePredictor(model)
        self.trusted = path is not None

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [H, W, 3] in [0, 1], boxes [K, 4] pixel xyxy -> masks [K, H, W] bool, scores [K]."""
        H, W = image.shape[:2]
        if boxes.shape[0] == 0:
            return torch.zeros(0, H, W, dtype=torch.bool), torch.zeros(0)
        self.predictor.set_image((image.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy())
        masks, scores, _ = self.predictor.predict(box=boxes.cpu().numpy(), multimask_output=False)
        masks = torch.as_tensor(masks).reshape(boxes.shape[0], H, W) > 0.5
        return masks, torch.as_tensor(scores).reshape(boxes.shape[0]).float()

    def supervision_masks(self, image: torch.Tensor, boxes: torch.Tensor, box_masks: torch.Tensor) -> torch.Tensor:
        """Masks [K, H, W] a loss may use: SAM2's where trusted, confident and large enough, else
        the projected-box masks ``box_masks`` [K, H, W] (always, for an untrusted model)."""
        if not self.trusted:
            return box_masks
        masks, scores = self(image, boxes)
        keep = (scores >= self.config.confidence_threshold) & (masks.flatten(1).sum(1) >= self.config.min_mask_area)
        return torch.where(keep[:, None, None].to(box_masks.device), masks.to(box_masks.device), box_masks)


def make_sam2_box(config: Optional[Sam2Config] = None) -> Sam2BoxSegmenter:
    return Sam2BoxSegmenter(config or Sam2Config())
