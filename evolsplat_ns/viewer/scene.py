"""What the viewer's 3D scene shows besides the render: the shown segment's camera frustums and the
starting viewpoint of a newly connected browser.

Frames: ``SegmentImages.cameras`` hold OpenGL camera-to-segment poses (x right, y up, z back); viser
takes OpenCV orientations (x right, y down, z forward) and positions scaled by nerfstudio's
``VISER_NERFSTUDIO_SCALE_RATIO``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO
from nerfstudio.viewer.viewer_elements import ViewerControl

if TYPE_CHECKING:
    import viser
    from nerfstudio.cameras.cameras import Cameras
    from nerfstudio.viewer.viewer import Viewer

    from evolsplat_ns.engine.datamanager import SegmentImages

LOOK_AHEAD_M = 10.0
"""Distance (metres) in front of the first view where a new client's orbit centre is put."""
CHASE_BACK_M, CHASE_UP_M = -1.0, 0.0
"""A new client starts this far behind (negative: ahead of) and above the first view, with that
view's vertical field of view. Ahead at its height, the view's own frustum (drawn with its image,
which would hide the render) is behind the client, and the road at the bottom of the picture is
road that view saw: from behind or above, or with viser's wider default field of view, the bottom
of the picture is the ground just under the cameras, which no view sees (a black hole)."""


class SegmentScene(ViewerControl):
    """Keeps the viewer's train-camera frustums on the shown segment and starts every new client at
    that segment's first keyframe view (instead of viser's default pose, which sees nothing of a
    street)."""

    def __init__(self) -> None:
        self.images: Optional[SegmentImages] = None
        self.viewer: Optional[Viewer] = None

    def _setup(self, viewer: Viewer) -> None:
        # The Viewer calls _setup on every ViewerControl it finds; it is the one hook that runs once
        # the viser server exists, so client-connect handling is registered here.
        super()._setup(viewer)
        viewer.viser_server.on_client_connect(self._start_client)

    def show(self, images: SegmentImages) -> None:
        """Make ``images`` (a segment's keyframe views) the frustums drawn in the viewer."""
        self.images = images
        if self.viewer is None or not hasattr(self.viewer, "camera_handles"):
            return  # no viewer, or it has not drawn its scene yet; init_scene will draw these
        for handle in self.viewer.camera_handles.values():
            handle.remove()
        self.viewer.init_scene(train_dataset=images, train_state=getattr(self.viewer, "train_state", "completed"))

    def _start_client(self, client: viser.ClientHandle) -> None:
        if self.images is not None and len(self.images) > 0:
            start_view(client, self.images.cameras)


def start_view(client: viser.ClientHandle, cameras: Cameras) -> None:
    """The pose a newly connected client starts at: near ``cameras``' first view (nerfstudio
    ``Cameras``, OpenGL camera-to-segment), with its vertical field of view (see ``CHASE_BACK_M``)."""
    fov = 2 * float(np.arctan(0.5 * float(cameras.height[0]) / float(cameras.fy[0])))
    look_from(client, cameras.camera_to_worlds[0].numpy(force=True), fov_rad=fov)


def look_from(client: viser.ClientHandle, c2w_opengl: np.ndarray, back_m: float = CHASE_BACK_M,
              up_m: float = CHASE_UP_M, fov_rad: Optional[float] = None) -> None:
    """Put ``client``'s camera ``back_m`` behind and ``up_m`` above an OpenGL camera-to-segment pose
    [3, 4], looking at a point ``LOOK_AHEAD_M`` in front of it, with that camera's up as the orbit's
    up (``back_m = up_m = 0``: exactly that camera's pose) and, when given, ``fov_rad`` as its
    vertical field of view."""
    forward, up = -c2w_opengl[:3, 2], c2w_opengl[:3, 1]  # OpenGL cameras look down -z, y up
    centre = c2w_opengl[:3, 3]
    eye = centre - back_m * forward + up_m * up
    with client.atomic():
        client.camera.position = eye * VISER_NERFSTUDIO_SCALE_RATIO
        client.camera.look_at = (centre + LOOK_AHEAD_M * forward) * VISER_NERFSTUDIO_SCALE_RATIO
        client.camera.up_direction = up
        if fov_rad is not None:
            client.camera.fov = float(fov_rad)
