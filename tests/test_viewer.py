"""The viewer surface without a browser: a checkpoint loaded in inference mode renders bare
cameras at once, the encoded-state cache, and the scene / segment / source-count controls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tiny_run import tiny_checkpoint


@pytest.fixture(scope="module")
def pipeline(tiny_dataset, tmp_path_factory):
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, _ = eval_setup(tiny_checkpoint(tiny_dataset, tmp_path_factory), test_mode="inference")
    return pipeline


@pytest.fixture
def first_segment(pipeline):
    """The segment shown after loading (shown again, with default settings, after each test)."""
    shown = pipeline.shown
    yield shown
    pipeline.show_segment(shown.segment_index)
    pipeline.model.render_num_sources = None


def viewer_camera(images, view: int = 0, height: int = 36, aspect: float = 1.5, shift=(0.0, 0.0, 0.0)):
    """The nerfstudio camera the viewer builds for a client at keyframe view ``view`` (OpenGL
    camera-to-segment), optionally moved by ``shift`` metres in the segment frame."""
    from nerfstudio.viewer.utils import CameraState, get_camera
    from nerfstudio.cameras.cameras import CameraType

    c2w = images.cameras.camera_to_worlds[view].clone()
    c2w[:, 3] += torch.tensor(shift)
    state = CameraState(fov=math.radians(60), aspect=aspect, c2w=c2w, camera_type=CameraType.PERSPECTIVE)
    return get_camera(state, height, int(height * aspect))


def count_encodes(model, monkeypatch) -> list[int]:
    """Records the number of source views of every ``model.encode`` call."""
    calls: list[int] = []
    encode = model.encode

    def counting(sources=None):
        calls.append(len(sources) if sources is not None else -1)
        return encode(sources)

    monkeypatch.setattr(model, "encode", counting)
    return calls


def test_loaded_checkpoint_has_a_context_and_renders_a_bare_camera(pipeline, first_segment):
    model, dataset = pipeline.model, pipeline.datamanager.dataset
    ctx = model.context
    assert ctx.key in model.segments and ctx.node is model.segments.get(ctx.key).node, "the context uses the checkpoint's node"
    seg = first_segment.segment_index
    assert ctx.key == dataset.key(seg)
    assert len(ctx.sources) == len(dataset.keyframes(seg)) * len(dataset.scenes[0].cameras)

    out = model.get_outputs_for_camera(viewer_camera(first_segment))
    assert out.keys() == {"rgb", "depth", "accumulation"}
    assert out["rgb"].shape == (36, 54, 3) and out["depth"].shape == out["accumulation"].shape == (36, 54, 1)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["accumulation"].mean() > 0.1 and out["rgb"].std() > 0.01, "the view sees the segment's Gaussians"


def test_encode_is_reused_until_the_nearest_sources_change(pipeline, first_segment, monkeypatch):
    model = pipeline.model
    calls = count_encodes(model, monkeypatch)
    model.get_outputs_for_camera(viewer_camera(first_segment, view=0))
    model.get_outputs_for_camera(viewer_camera(first_segment, view=0, shift=(0.0, 0.0, 0.02)))
    assert len(calls) == 1, "a small move keeps the nearest sources, so nothing is re-encoded"
    far = len(first_segment) - 1  # the last keyframe's last camera: other nearest sources
    model.get_outputs_for_camera(viewer_camera(first_segment, view=far))
    assert len(calls) == 2
    first_segment_again = pipeline.show_segment(first_segment.segment_index)
    model.get_outputs_for_camera(viewer_camera(first_segment_again, view=0))
    assert len(calls) == 3, "a new context (as every training step makes) starts with an empty cache"


def test_cached_render_equals_a_fresh_one(pipeline, first_segment):
    model = pipeline.model
    camera = viewer_camera(first_segment, view=1)
    cached = model.get_outputs_for_camera(camera)
    cached = model.get_outputs_for_camera(camera)
    assert model.context.segment.encoded.hits >= 1
    pipeline.show_segment(first_segment.segment_index)
    fresh = model.get_outputs_for_camera(camera)
    for k in fresh:
        torch.testing.assert_close(cached[k], fresh[k])


def test_controls_switch_scene_and_segment(pipeline, first_segment):
    from nerfstudio.viewer.utils import parse_object
    from nerfstudio.viewer.viewer_elements import ViewerControl, ViewerElement

    controls, dataset, model = pipeline.segments, pipeline.datamanager.dataset, pipeline.model
    elements = {path for path, _ in parse_object(pipeline, ViewerElement, "Custom Elements")}
    assert elements == {"Custom Elements/segments/scene", "Custom Elements/segments/segment",
                        "Custom Elements/segments/source_views", "Custom Elements/segments/follow_camera",
                        "Custom Elements/segments/time"}
    assert [c for _, c in parse_object(pipeline, ViewerControl, "Custom Elements")] == [controls.frustums]
    assert not any(k.startswith("segments.") for k in pipeline.state_dict()), "controls add nothing to checkpoints"

    eval_scene = next(s for s in controls.scene.options if s.endswith("(eval)"))
    controls.scene.value = eval_scene
    controls.scene.cb_hook(controls.scene)
    seg = controls.selected_segment()
    assert dataset.scenes[dataset.segments[seg].scene_index].name == eval_scene.split()[0]
    assert model.context.key == dataset.key(seg) and controls.frustums.images.segment_index == seg
    out = model.get_outputs_for_camera(viewer_camera(controls.frustums.images))
    assert out["accumulation"].mean() > 0.1, "an unseen (eval) scene renders feed-forward"

    train_scene = controls.scene.options[0]
    controls.scene.value = train_scene
    controls.scene.cb_hook(controls.scene)
    for label in controls.segment.options:
        controls.segment.value = label
        controls.segment.cb_hook(controls.segment)
        assert model.context.key == dataset.key(controls.selected_segment())


def test_source_view_slider_sets_the_sources_per_frame(pipeline, first_segment, monkeypatch):
    model, controls = pipeline.model, pipeline.segments
    configured = model.predictor.projector.num_neighbour_select
    calls = count_encodes(model, monkeypatch)
    for count in (1, configured + 2):
        controls.source_views.value = count
        controls.source_views.cb_hook(controls.source_views)
        model.get_outputs_for_camera(viewer_camera(first_segment))
        assert calls[-1] == count
    assert model.predictor.projector.num_neighbour_select == configured, "training's setting is untouched"


def test_default_start_pose_looks_along_the_first_view():
    """The pose a new browser gets: behind and above view 0, looking the same way (OpenGL)."""
    from evolsplat_ns.viewer.scene import CHASE_BACK_M, LOOK_AHEAD_M, look_from
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO as S

    class Camera:
        position = look_at = up_direction = None

    class Client:
        camera = Camera()

        def atomic(self):
            import contextlib

            return contextlib.nullcontext()

    c2w = np.array([[0.0, 0, -1, 1], [-1, 0, 0, 0], [0, 1, 0, 2]])  # OpenGL camera looking along +x, z up
    client = Client()
    look_from(client, c2w)
    direction = client.camera.look_at - client.camera.position
    np.testing.assert_allclose(direction / np.linalg.norm(direction), [1, 0, 0], atol=0.05)
    np.testing.assert_allclose(client.camera.up_direction, [0, 0, 1])
    assert client.camera.position[0] == pytest.approx((1 - CHASE_BACK_M) * S)
    assert client.camera.look_at[0] == pytest.approx((1 + LOOK_AHEAD_M) * S)


def test_start_view_uses_the_first_cameras_field_of_view_and_stands_ahead_of_it():
    """A new client sees what the first keyframe camera saw: its vertical field of view, from
    ahead of it at its height (so the road under the camera, which no view saw, is out of sight)."""
    import math

    import torch
    from nerfstudio.cameras.cameras import Cameras
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO as S

    from evolsplat_ns.viewer.scene import start_view

    class Camera:
        position = look_at = up_direction = fov = None

    class Client:
        camera = Camera()

        def atomic(self):
            import contextlib

            return contextlib.nullcontext()

    c2w = torch.tensor([[[0.0, 0, -1, 1], [-1, 0, 0, 0], [0, 1, 0, 2]]])  # OpenGL, looking along +x, z up
    cams = Cameras(camera_to_worlds=c2w, fx=100.0, fy=100.0, cx=96.0, cy=64.0, width=192, height=128)
    client = Client()
    start_view(client, cams)
    assert client.camera.fov == pytest.approx(2 * math.atan(64 / 100))
    assert client.camera.position[0] > 1 * S and client.camera.position[2] == pytest.approx(2 * S)


def test_time_control_places_actors(pipeline):
    """The viewer's time slider sets when bare cameras place moving actors; the checkbox returns
    to the nearest source's time."""
    controls, model = pipeline.segments, pipeline.model
    frames = pipeline.datamanager.dataset.segments[pipeline.shown.segment_index].frames
    controls.follow_camera.value = False
    controls.time.value = 1.0
    controls._on_time(controls.time)
    assert model.render_time == frames[-1]
    controls.time.value = 0.5
    controls._on_time(controls.time)
    assert model.render_time == pytest.approx(frames[0] + 0.5 * (frames[-1] - frames[0]))
    controls.follow_camera.value = True
    controls._on_time(controls.follow_camera)
    assert model.render_time is None


@pytest.mark.parametrize("hw, aspect", [((50, 71), 1.046), ((30, 31), 1.046), ((40, 30), 2.0), ((30, 31), 1.2)])
def test_as_sent_letterboxes_renders_as_nerfstudios_viewer_sends_them(hw, aspect):
    """``as_sent`` against nerfstudio's own ``_send_output_to_viewer``, run on a stand-in state
    machine whose client records the image it would send the page."""
    from types import SimpleNamespace

    from nerfstudio.utils.colormaps import ColormapOptions
    from nerfstudio.viewer.render_state_machine import RenderStateMachine

    from evolsplat_ns.viewer.screenshot import as_sent

    rgb = torch.rand(*hw, 3, generator=torch.Generator().manual_seed(0)).clamp(1 / 255, 1)
    sent = {}
    control = SimpleNamespace(output_render="rgb", colormap_options=ColormapOptions(), split=False,
                              update_output_options=lambda keys: None)
    viewer = SimpleNamespace(control_panel=control, update_colormap_options=lambda **kw: None,
                             config=SimpleNamespace(jpeg_quality=75, image_format="jpeg"),
                             render_tab_state=SimpleNamespace(preview_render=False),
                             stats_markdown=SimpleNamespace(content=""), make_stats_markdown=lambda *a: "")
    scene = SimpleNamespace(set_background_image=lambda image, **kw: sent.setdefault("image", image))
    machine = SimpleNamespace(output_keys=None, viewer=viewer, viser_scale_ratio=0.1,
                              client=SimpleNamespace(camera=SimpleNamespace(aspect=aspect), scene=scene))
    RenderStateMachine._send_output_to_viewer(machine, {"rgb": rgb})
    ours = as_sent(rgb.numpy(), aspect)
    assert ours.shape == sent["image"].shape
    np.testing.assert_array_equal((ours * 255).astype(np.uint8), sent["image"])
