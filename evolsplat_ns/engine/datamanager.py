"""nerfstudio DataManager over :class:`MultiSceneDataset`.

Train batches are whole samples (source + target views of one segment) plus the segment's point
cloud; eval items are held-out frames of held-out scenes. ``fixed_indices_eval_dataloader`` yields
``(camera, batch)`` per held-out view (nerfstudio's interface; our own evaluation runs the
held-out loop of :mod:`evolsplat_ns.engine.evaluation` instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.datamanagers.base_datamanager import DataManager, DataManagerConfig
from nerfstudio.data.scene_box import SceneBox

from evolsplat_ns.data.dataset import MultiSceneDataset, MultiSceneDatasetConfig
from evolsplat_ns.data.prefetch import Prefetcher
from evolsplat_ns.data.types import Sample
from evolsplat_ns.data.cameras import views_to_cameras


@dataclass
class EVolSplatDataManagerConfig(DataManagerConfig):
    _target: Type = field(default_factory=lambda: EVolSplatDataManager)
    data: Optional[Path] = None
    """Dataset folder (ns-train's --data sets this); overrides dataset.data."""
    dataset: MultiSceneDatasetConfig = field(default_factory=MultiSceneDatasetConfig)
    prefetch: bool = True
    """Draw the next training sample in a background thread while the current step runs."""


class SegmentImages:
    """The minimal dataset interface nerfstudio's pipeline and viewer read: cameras, images, box.

    It shows the keyframe views of one segment (cameras in that segment's frame, OpenGL).
    """

    def __init__(self, sample: Sample):
        self.sample = sample
        self.cameras = views_to_cameras(sample.source)
        self.segment_index: Optional[int] = None
        """Index of the shown segment in ``MultiSceneDataset.segments`` (set by :meth:`of_segment`)."""
        pts = sample.source.camtoworlds[:, :3, 3]
        lo, hi = pts.min(0).values - 50.0, pts.max(0).values + 50.0
        self.scene_box = SceneBox(aabb=torch.stack([lo, hi]))
        self.metadata: dict = {}

    @classmethod
    def of_segment(cls, dataset: MultiSceneDataset, segment_index: int) -> "SegmentImages":
        """All keyframe views of segment ``segment_index`` (the sample's sources; its one target is
        the first keyframe, unused), i.e. the pool a viewer picks nearest sources from."""
        kf = dataset.keyframes(segment_index)
        images = cls(dataset.load_sample(segment_index, kf, kf[:1]))
        images.segment_index = segment_index
        return images

    def __len__(self) -> int:
        return len(self.sample.source)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.sample.source.images[i], "image_idx": i}


class EvalViews:
    """Iterable of (camera, batch) for every held-out target view (lazy; loads per item)."""

    def __init__(self, dataset: MultiSceneDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.num_eval_views

    def __iter__(self) -> Iterator[tuple[Cameras, dict]]:
        for i in range(len(self.dataset.eval_items)):
            sample = self.dataset.eval_sample(i)
            cams = views_to_cameras(sample.target)
            for v in range(len(sample.target)):
                yield cams[v : v + 1], {"image": sample.target.images[v], "view": v, "sample": sample}


class EVolSplatDataManager(DataManager):
    config: EVolSplatDataManagerConfig

    def __init__(self, config: EVolSplatDataManagerConfig, device: str = "cpu", test_mode: str = "val",
                 world_size: int = 1, local_rank: int = 0, **kwargs):
        self.config = config
        self.device = device
        self.test_mode = test_mode
        if config.data is not None:
            config.dataset.data = Path(config.data)
        self.dataset = MultiSceneDataset(config.dataset)
        self.train_dataset = SegmentImages.of_segment(self.dataset, self.dataset.train_segment_ids[0])
        self.eval_dataset = EvalViews(self.dataset) if self.dataset.eval_items else None
        self._eval_cursor = 0
        self._train_stream = Prefetcher(self._draw_train, self.dataset.state_dict, self.dataset.load_state_dict,
                                        enabled=config.prefetch and test_mode == "val")
        super().__init__()

    @property
    def fixed_indices_eval_dataloader(self) -> EvalViews:
        if self.eval_dataset is None:
            raise RuntimeError(f"no held-out frames under {self.config.dataset.data}: set "
                               "dataset.eval_frame_interval > 0 and at least one eval scene")
        return self.eval_dataset

    def setup_train(self) -> None:
        """Nothing to set up: MultiSceneDataset loads lazily per sample."""

    def setup_eval(self) -> None:
        """Nothing to set up: eval samples load lazily."""

    def next_train(self, step: int) -> tuple[Sample, dict]:
        self.train_count += 1
        return self._train_stream.next()

    def _draw_train(self) -> tuple[Sample, dict]:
        sample = self.dataset.next_train_sample()
        return sample, {"point_cloud": self.point_cloud_for(sample)}

    def next_eval(self, step: int) -> tuple[Sample, dict]:
        """The next eval sample (cycling through held-out frames) with its segment's point cloud."""
        self.eval_count += 1
        i = self._eval_cursor % len(self.dataset.eval_items)
        self._eval_cursor += 1
        sample = self.dataset.eval_sample(i)
        return sample, {"point_cloud": self.point_cloud_for(sample)}

    def next_eval_image(self, step: int) -> tuple[Sample, dict]:
        return self.next_eval(step)

    def point_cloud_for(self, sample: Sample):
        """The point cloud of ``sample``'s segment (cached)."""
        return self.dataset.point_cloud(self.dataset.segment_index(sample.key))

    def get_train_rays_per_batch(self) -> int:
        c = self.config.dataset
        s = self.train_dataset.sample.source
        return c.num_target_keyframes * len(self.dataset.scenes[0].cameras) * s.height * s.width

    def get_eval_rays_per_batch(self) -> int:
        return self.get_train_rays_per_batch()

    def get_datapath(self) -> Path:
        return Path(self.config.dataset.data)

    def get_param_groups(self) -> dict:
        return {}

    def get_extra_state(self) -> dict:
        """The data stream's position, so a resumed run draws the same next sample."""
        return self._train_stream.state_dict()

    def set_extra_state(self, state: dict) -> None:
        """Restore the stream when training resumes; evaluation and inference (possibly on other
        data, e.g. zero-shot scenes) have no stream to restore."""
        if self.test_mode == "val":
            self._train_stream.load_state_dict(state)
