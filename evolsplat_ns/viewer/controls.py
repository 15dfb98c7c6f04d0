"""Viewer GUI of the EVolSplat pipeline: scene and segment dropdowns, a source-view slider.

nerfstudio's Viewer finds custom GUI elements by walking the pipeline's ``nn.Module`` tree
(``parse_object``: attributes that are ``ViewerElement`` / ``ViewerControl``, recursing only into
``nn.Module`` attributes). :class:`SegmentControls` is therefore a parameter-free ``nn.Module`` that
the pipeline holds as an attribute; it adds nothing to checkpoints. The pipeline builds it from its
``viewer_controls`` config (:class:`SegmentControlsConfig`, set by the method configs), so the
engine never imports this module. It talks back to the pipeline through callables only: holding
the pipeline or model would register them as its submodules.

Element callbacks run under the viewer's train lock (nerfstudio wraps them), so switching segments
never interleaves with a render or a training step. During ``ns-train --vis viewer`` every training
step makes its own sample the rendered segment; pause training to look at a chosen one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Type

from nerfstudio.configs.base_config import InstantiateConfig
from nerfstudio.viewer.viewer_elements import ViewerCheckbox, ViewerDropdown, ViewerSlider
from torch import nn

from evolsplat_ns.data.dataset import MultiSceneDataset
from evolsplat_ns.engine.datamanager import SegmentImages
from evolsplat_ns.viewer.scene import SegmentScene

if TYPE_CHECKING:
    from evolsplat_ns.engine.pipeline import EVolSplatPipeline

MAX_SOURCE_VIEWS = 12
"""Slider limit: encoded features grow linearly with the number of sources (N x S x window)."""


def segment_menu(dataset: MultiSceneDataset) -> dict[str, dict[str, int]]:
    """Scene label -> segment label -> index into ``dataset.segments``, in dataset order.

    Scenes the model never trains on are labelled "(eval)": what the viewer shows there is a
    feed-forward reconstruction of an unseen scene.
    """
    train = set(dataset.all_train_segment_ids)  # every rank's, in a data-parallel run
    menu: dict[str, dict[str, int]] = {}
    for i, seg in enumerate(dataset.segments):
        scene = dataset.scenes[seg.scene_index].name
        if not any(j in train for j, s in enumerate(dataset.segments) if s.scene_index == seg.scene_index):
            scene = f"{scene} (eval)"
        label = f"seg{seg.segment_index:03d} (frames {seg.frames[0]}-{seg.frames[-1]})"
        menu.setdefault(scene, {})[label] = i
    return menu


@dataclass
class SegmentControlsConfig(InstantiateConfig):
    """The viewer's segment pickers and source-view slider (``setup(pipeline=...)`` builds them)."""

    _target: Type = field(default_factory=lambda: SegmentControls)


class SegmentControls(nn.Module):
    """Scene / segment pickers and the number of source views per rendered frame.

    Args:
        config: this element's config (no settings yet).
        pipeline: the pipeline to steer; only its dataset, its ``show_segment`` and
            ``set_render_num_sources`` callables, the shown segment and the model's
            ``num_neighbour_select`` (the slider's start) are taken, never the pipeline itself.
    """

    def __init__(self, config: SegmentControlsConfig, pipeline: EVolSplatPipeline) -> None:
        super().__init__()
        shown, num_sources = pipeline.shown, pipeline.model.config.num_neighbour_select
        self._menu = segment_menu(pipeline.datamanager.dataset)
        self._show_segment: Callable[[int], SegmentImages] = pipeline.show_segment
        self._set_num_sources: Callable[[int], None] = pipeline.set_render_num_sources
        self._set_time: Callable[[Optional[float]], None] = pipeline.set_render_time
        scene, label = self._locate(shown.segment_index)
        self.scene = ViewerDropdown("Scene", scene, list(self._menu), cb_hook=self._on_scene,
                                    hint="Scene to reconstruct (eval = never trained on)")
        self.segment = ViewerDropdown("Segment", label, list(self._menu[scene]), cb_hook=self._on_segment,
                                      hint="Segment of the scene; poses are in its first frame's vehicle frame")
        self.source_views = ViewerSlider("Source views", min(num_sources, MAX_SOURCE_VIEWS), 1, MAX_SOURCE_VIEWS,
                                        step=1, cb_hook=self._on_num_sources,
                                        hint="Nearest keyframe views fed to the network per frame")
        self.follow_camera = ViewerCheckbox("Actors at camera time", True, cb_hook=self._on_time,
                                            hint="Place moving actors at the time of the source view nearest to the "
                                                 "camera; off: at the Time slider's")
        self.time = ViewerSlider("Time", 0.0, 0.0, 1.0, step=0.01, cb_hook=self._on_time,
                                 hint="Where moving actors are placed: 0 = the segment's first frame, 1 = its last")
        self.frustums = SegmentScene()
        self.frustums.show(shown)

    def selected_segment(self) -> int:
        """Index into ``dataset.segments`` of the dropdowns' current choice."""
        return self._menu[self.scene.value][self.segment.value]

    def _locate(self, segment_index: int) -> tuple[str, str]:
        for scene, segments in self._menu.items():
            for label, i in segments.items():
                if i == segment_index:
                    return scene, label
        raise KeyError(f"segment {segment_index} is not in the dataset's segment list")

    def _on_scene(self, _: ViewerDropdown) -> None:
        # Setting options does not fire the segment dropdown's callback (only user edits and value
        # assignments do), so the new scene's segment is shown here.
        self.segment.set_options(list(self._menu[self.scene.value]))
        self._show(self.selected_segment())

    def _on_segment(self, _: ViewerDropdown) -> None:
        self._show(self.selected_segment())

    def _on_num_sources(self, slider: ViewerSlider) -> None:
        self._set_num_sources(int(slider.value))

    def _on_time(self, _: object) -> None:
        self._set_time(None if self.follow_camera.value else float(self.time.value))

    def _show(self, segment_index: int) -> None:
        self.frustums.show(self._show_segment(segment_index))

