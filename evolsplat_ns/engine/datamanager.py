"""nerfstudio DataManager over :class:`MultiSceneDataset`.

Train batches are whole samples (source + target views of one segment) plus the segment's point
cloud; eval items are held-out frames of held-out scenes. ``fixed_indices_eval_dataloader`` yields
``(camera, batch)`` per held-out view (nerfstudio's interface; our own evaluation runs the
held-out loop of :mod:`evolsplat_ns.engine.evaluation` instead).

Stock nerfstudio tools (``ns-render``) read a narrower surface, which both datasets provide:
``cameras`` (one per image, with ``metadata`` saying which segment's context renders it),
``__getitem__`` and ``_dataparser_outputs.image_filenames``. ``ns-render spiral`` and ``dataset``
check ``isinstance`` against nerfstudio's Vanilla data manager and its config, so ours derive from
them while replacing every behaviour (none of their ray-sampling fields is used; they are hidden).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Type

import numpy as np
import torch
import tyro
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.datamanagers.base_datamanager import DataManager, VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.data.utils.dataloaders import FixedIndicesEvalDataloader

from evolsplat_ns.data.dataset import MultiSceneDataset, MultiSceneDatasetConfig
from evolsplat_ns.data.sharding import Shard
from evolsplat_ns.engine import distributed
from evolsplat_ns.data.prefetch import Prefetcher
from evolsplat_ns.data.sources import get_source
from evolsplat_ns.data.validate import raise_on_errors
from evolsplat_ns.data.types import Sample
from evolsplat_ns.data.cameras import poses_to_cameras, views_to_cameras


_Hidden = tyro.conf.Suppress
"""Inherited ray-sampler fields of nerfstudio's Vanilla data manager that nothing here reads."""


@dataclass
class EVolSplatDataManagerConfig(VanillaDataManagerConfig):
    """Samples of segments of many scenes (see :class:`MultiSceneDatasetConfig` for every knob)."""

    _target: Type = field(default_factory=lambda: EVolSplatDataManager)
    data: Optional[Path] = None
    """Dataset folder: a scene folder or a folder of scene folders (ns-train's ``--data`` sets it).
    None: the method's default, ``outputs/demo/data-192x128`` (lite) or ``-960x640`` (full), where
    ``scripts/demo.sh`` writes its synthetic dataset."""
    dataset: MultiSceneDatasetConfig = field(default_factory=MultiSceneDatasetConfig)
    """The multi-scene dataset: where the scenes are, segments, split, point clouds."""
    prefetch: bool = True
    """Draw the next training sample in a background thread while the current step runs."""
    validation: Literal["fast", "full", "off"] = "fast"
    """Check every scene (train and eval) before step 0 (:mod:`evolsplat_ns.data.validate`): ``fast``
    reads headers, LiDAR and JSON; ``full`` also decodes every image, mask and depth/flow array."""
    masks_on_gpu: _Hidden[bool] = False
    images_on_gpu: _Hidden[bool] = False
    dataparser: _Hidden[Any] = None
    train_num_rays_per_batch: _Hidden[int] = 1024
    train_num_images_to_sample_from: _Hidden[int] = -1
    train_num_times_to_repeat_images: _Hidden[int] = -1
    eval_num_rays_per_batch: _Hidden[int] = 1024
    eval_num_images_to_sample_from: _Hidden[int] = -1
    eval_num_times_to_repeat_images: _Hidden[int] = -1
    eval_image_indices: _Hidden[Optional[tuple[int, ...]]] = (0,)
    collate_fn: _Hidden[Any] = None
    camera_res_scale_factor: _Hidden[float] = 1.0
    patch_size: _Hidden[int] = 1
    pixel_sampler: _Hidden[Any] = None


def validate_dataset(config: MultiSceneDatasetConfig, depth: str) -> None:
    """Check every scene the run reads (train and eval) before anything trains: DatasetValidationError
    listing each problem by file; warnings are printed. Data sources without a validator are trusted."""
    if depth == "off":
        return
    source = get_source(config.data_source)
    validate = getattr(source, "validate_scene", None)
    if validate is None:
        return
    need = config.num_source_keyframes + config.num_target_keyframes
    results = [validate(p, depth == "full", need) for p in source.find_scenes(Path(config.data))]
    for warning in raise_on_errors(Path(config.data), results):
        print(f"warning: {warning}", flush=True)


@dataclass
class ImageFiles:
    """What ``ns-render dataset`` reads of nerfstudio's ``DataparserOutputs``: one file per image
    (output names mirror them) and the scale of raw depth (ours is metric: 1)."""

    image_filenames: list[Path]
    dataparser_scale: float = 1.0
    metadata: dict = field(default_factory=dict)
    """Empty: nerfstudio's pipeline looks here for seed points (``points3D_xyz``); ours come per segment."""

    def save_dataparser_transform(self, path: Path) -> None:
        """What ``Trainer.train`` writes first (``dataparser_transforms.json``): ours is the identity
        at scale 1, since every sample is posed in its own segment frame (docs/architecture.md).
        Written by rank 0 only in a data-parallel job."""
        if not distributed.current().world.is_main:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"transform": np.eye(4)[:3].tolist(), "scale": self.dataparser_scale,
                                    "note": "identity: evolsplat-ns poses every sample in its segment frame"},
                                   indent=2))


class SegmentImages:
    """The minimal dataset interface nerfstudio's pipeline and viewer read: cameras, images, box.

    It shows the keyframe views of one segment (cameras in that segment's frame, OpenGL).
    """

    def __init__(self, sample: Sample, segment_index: Optional[int] = None, files: Optional[list[Path]] = None):
        self.sample = sample
        self.segment_index = segment_index
        """Index of the shown segment in ``MultiSceneDataset.segments`` (set by :meth:`of_segment`)."""
        meta = None if segment_index is None else {"segment_index": torch.full((len(sample.source), 1), segment_index)}
        self.cameras = views_to_cameras(sample.source, meta)
        self._dataparser_outputs = ImageFiles(files or [])
        pts = sample.source.camtoworlds[:, :3, 3]
        lo, hi = pts.min(0).values - 50.0, pts.max(0).values + 50.0
        self.scene_box = SceneBox(aabb=torch.stack([lo, hi]))
        self.metadata: dict = {}

    @classmethod
    def of_segment(cls, dataset: MultiSceneDataset, segment_index: int) -> "SegmentImages":
        """All keyframe views of segment ``segment_index`` (the sample's sources; its one target is
        the first keyframe, unused), i.e. the pool a viewer picks nearest sources from."""
        kf = dataset.keyframes(segment_index)
        sample = dataset.load_sample(segment_index, kf, kf[:1])
        layout = dataset.scenes[dataset.segments[segment_index].scene_index].layout
        files = [layout.image_path(int(t), int(c)) for t, c in zip(sample.source.frame_ids, sample.source.cam_ids)]
        return cls(sample, segment_index, files)

    def __len__(self) -> int:
        return len(self.sample.source)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.sample.source.images[i], "image_idx": i}


class EvalViews:
    """Iterable of (camera, batch) for every held-out target view (lazy; loads per item).

    View ``k`` is ``views[k]``: (eval item, index among its sample's targets, camera id).
    """

    def __init__(self, dataset: MultiSceneDataset):
        self.dataset = dataset
        self.views = [(i, v, c) for i in range(len(dataset.eval_items)) for v, c in enumerate(dataset.eval_cameras(i))]
        """(eval item, index in its sample's targets, camera id) of every held-out view, in order."""
        self.frame_segment: Optional[int] = None
        """The shown segment (set by the pipeline): :attr:`cameras` of its scene are posed in its frame."""
        files = [dataset.scenes[dataset.segments[dataset.eval_items[i][0]].scene_index].layout.image_path(
            dataset.eval_items[i][1], c) for i, _, c in self.views]
        self._dataparser_outputs = ImageFiles(files)

    def __len__(self) -> int:
        return self.dataset.num_eval_views

    @property
    def cameras(self) -> Cameras:
        """Every held-out view [N] (poses from calibration; no image is read), OpenGL camera-to-frame.

        The frame is the shown segment's (:attr:`frame_segment`) for views of its scene, so a path
        through them (``ns-render interpolate``) is continuous and renders in the shown context;
        views of other scenes are in their own segment's frame. ``metadata`` [N, 1] each: ``eval_index``
        and ``view`` (its index in that eval sample's targets) let the pipeline render every view in
        its own context; ``frame_segment`` is the segment whose frame the pose is in.
        """
        d = self.dataset
        poses, Ks, frame_of, index = [], [], [], []
        for i, v, c in self.views:
            seg, t = d.eval_items[i]
            scene_index = d.segments[seg].scene_index
            scene = d.scenes[scene_index]
            shown = self.frame_segment
            ref = shown if shown is not None and d.segments[shown].scene_index == scene_index else seg
            ref_from_world = np.linalg.inv(scene.ego_to_world[d.segments[ref].frames[0]])
            poses.append(ref_from_world @ scene.cam_to_world(t, c))
            Ks.append(scene.calib[c].K)
            frame_of.append(ref)
            index.append((i, v))
        W, H = d.scenes[0].image_size(d.scenes[0].cameras[0])
        index_t = torch.tensor(index)
        meta = {"eval_index": index_t[:, :1], "view": index_t[:, 1:], "frame_segment": torch.tensor(frame_of)[:, None]}
        return poses_to_cameras(torch.from_numpy(np.stack(poses)).float(), torch.from_numpy(np.stack(Ks)).float(),
                                W, H, meta)

    def __getitem__(self, k: int) -> dict:
        """Held-out view ``k``'s ground-truth image [H, W, 3] in [0, 1] (only that image is read)."""
        d = self.dataset
        i, _, cam = self.views[k]
        seg, t = d.eval_items[i]
        scene = d.scenes[d.segments[seg].scene_index]
        view = scene.load_views([t], np.eye(4), cameras=[cam])
        return {"image": view.images[0], "image_idx": k}

    def __iter__(self) -> Iterator[tuple[Cameras, dict]]:
        for i in range(len(self.dataset.eval_items)):
            sample = self.dataset.eval_sample(i)
            cams = views_to_cameras(sample.target)
            for v in range(len(sample.target)):
                yield cams[v : v + 1], {"image": sample.target.images[v], "view": v, "sample": sample}


class EVolSplatDataManager(VanillaDataManager):
    """Serves :class:`MultiSceneDataset` samples. Derives from nerfstudio's ``VanillaDataManager``
    only to pass ``ns-render``'s type checks; none of its behaviour is inherited (its ``__init__``
    is skipped, every method it would use is defined here)."""

    config: EVolSplatDataManagerConfig

    def __init__(self, config: EVolSplatDataManagerConfig, device: str = "cpu", test_mode: str = "val",
                 world_size: int = 1, local_rank: int = 0, **kwargs):
        self.config = config
        self.device = device
        self.test_mode = test_mode
        if config.data is not None:
            config.dataset.data = Path(config.data)
        validate_dataset(config.dataset, config.validation)
        world = distributed.current().world
        # Training in a data-parallel job: this rank's shard of the training segments. Evaluation
        # and tools (ns-eval, ns-viewer, ...) never shard.
        self.shard = Shard(world.rank, world.size) if test_mode == "val" else Shard()
        self.world_size = self.shard.world_size
        self.dataset = MultiSceneDataset(config.dataset, self.shard)
        self.train_dataset = SegmentImages.of_segment(self.dataset, self.dataset.train_segment_ids[0])
        self.eval_dataset = EvalViews(self.dataset) if self.dataset.eval_items else None
        self._eval_cursor = 0
        self._train_stream = Prefetcher(self._draw_train, self.dataset.state_dict, self.dataset.load_state_dict,
                                        enabled=config.prefetch and test_mode == "val")
        DataManager.__init__(self)

    def show(self, images: SegmentImages) -> None:
        """Make ``images`` (the pipeline's shown segment) what stock tools see: the train dataset
        (``ns-render interpolate --pose-source train``, viewer frustums) and the frame of the
        held-out views of its scene."""
        self.train_dataset = images
        if self.eval_dataset is not None:
            self.eval_dataset.frame_segment = images.segment_index

    @property
    def train_dataparser_outputs(self) -> ImageFiles:
        """The shown segment's image files (``ns-render dataset --split train`` names outputs after them)."""
        return self.train_dataset._dataparser_outputs

    @property
    def eval_dataloader(self) -> FixedIndicesEvalDataloader:
        """The shown segment's keyframe views: ``ns-render spiral`` circles its first camera."""
        return FixedIndicesEvalDataloader(self.train_dataset, device=self.device)

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
        # Images stay uint8 until the model moves them to its device (Views.to): the host never
        # converts them nor pins their 4x larger float copy (7 images at 960x640: 12.9 MB, not 51.6).
        sample = self.dataset.next_train_sample(uint8_rgb=True)
        if torch.device(self.device).type == "cuda":
            # Page-locked, so the model's non-blocking copy to the GPU overlaps the step (a pageable
            # copy stalls the stream); done here, in the prefetch thread.
            sample = sample.pin_memory()
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
        data, e.g. zero-shot scenes) have no stream to restore.

        ``state`` is one stream (a one-process checkpoint) or ``{"world_size": W, "streams": [...]}``
        (a data-parallel one, one per rank). Resumed with the same number of ranks, each rank
        continues its own stream; with another number, segments are reassigned
        (:mod:`evolsplat_ns.data.sharding`) and the streams start again from the seed (said once).
        """
        if self.test_mode != "val":
            return
        streams, saved = (state["streams"], state["world_size"]) if "streams" in state else ([state], 1)
        if saved == self.shard.world_size:
            self._train_stream.load_state_dict(streams[self.shard.rank])
        elif self.shard.rank == 0:
            print(f"the checkpoint's data streams are for {saved} rank(s), this run has {self.shard.world_size}: "
                  "training segments are reassigned to the ranks and the data streams start from the seed", flush=True)
