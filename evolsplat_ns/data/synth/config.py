"""``SynthConfig``: every knob of the synthetic driving-scene generator, with validation."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_CAMERAS = 12
RAYCASTER_CHOICES = ("auto", "open3d", "torch")  # sensors.RAYCASTERS (kept here: config imports nothing)
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class SynthConfig:
    """Settings of ``evolsplat-synth``. Units: metres, seconds, degrees, pixels.

    Each field's ``metadata["help"]`` is the CLI help text (the CLI builds its flags from them).
    """

    scenes: int = field(default=1, metadata={"help": "number of scenes, written as OUT/000, OUT/001, ..."})
    first_scene: int = field(default=0, metadata={"help": "index of the first scene: writes OUT/{first}, ..., "
                                                          "OUT/{first+scenes-1} (scene i is the same whatever "
                                                          "the split, so several processes can share one OUT)"})
    frames: int = field(default=40, metadata={"help": "frames per scene"})
    cameras: int = field(default=3, metadata={"help": "cameras 0..C-1 (1 to 12): up to 5 Waymo's 0 FRONT, 1 "
                                                       "FRONT_LEFT, 2 FRONT_RIGHT, 3 SIDE_LEFT, 4 SIDE_RIGHT; 6 or "
                                                       "more a roof ring 360/C apart, front first, then left/right "
                                                       "alternating (an even C ends with a rear camera); names "
                                                       "in cameras.json"})
    width: int = field(default=480, metadata={"help": "image width in pixels"})
    height: int = field(default=320, metadata={"help": "image height in pixels"})
    seed: int = field(default=0, metadata={"help": "scene i uses numpy.random.default_rng(seed + i)"})
    fps: float = field(default=10.0, metadata={"help": "frame rate (Waymo: 10 Hz)"})
    ego_speed: float = field(default=8.0, metadata={"help": "ego vehicle speed in m/s"})
    hfov_deg: float = field(default=50.0, metadata={"help": "horizontal field of view of every camera "
                                                             "(Waymo FRONT: about 50)"})
    lidar_beams: int = field(default=32, metadata={"help": "LiDAR beams (rows), spread over the elevation range"})
    lidar_azimuths: int = field(default=1024, metadata={"help": "LiDAR azimuth steps per sweep (columns)"})
    lidar_range: float = field(default=75.0, metadata={"help": "LiDAR maximum range in metres (Waymo TOP: 75)"})
    moving_cars: int = field(default=4, metadata={"help": "moving cars per scene (both lanes)"})
    shadows: bool = field(default=True, metadata={"help": "cast sun shadows from the static scene"})
    box_noise_trans: float = field(default=0.0, metadata={"help": "std-dev (m) of Gaussian noise added to the "
                                                                  "written boxes' horizontal position (true boxes "
                                                                  "go to instances_gt/)"})
    box_noise_rot: float = field(default=0.0, metadata={"help": "std-dev (degrees) of Gaussian noise added to the "
                                                                "written boxes' yaw (true boxes go to instances_gt/)"})
    jpeg_quality: int = field(default=95, metadata={"help": "JPEG quality of images/ (1 to 100)"})
    overwrite: bool = field(default=False, metadata={"help": "replace scene folders that already exist"})
    raycaster: str = field(default="auto", metadata={
        "help": "ray-casting backend: open3d (Embree, CPU), torch (pure torch, any device: for machines "
                "without open3d, fast on CUDA) or auto (open3d when it imports, else torch); both give the "
                "same scenes up to float rounding", "choices": RAYCASTER_CHOICES})
    device: str = field(default="auto", metadata={
        "help": "torch device of the torch ray caster: auto (cuda when available, else cpu), cpu, cuda, "
                "cuda:N; ignored by open3d"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting and its valid range."""
        rules = {
            "scenes": (self.scenes >= 1, ">= 1"),
            "first_scene": (0 <= self.first_scene <= 999 - self.scenes + 1, "0 to 1000 - scenes (folders are 000-999)"),
            "frames": (self.frames >= 1, ">= 1"),
            "cameras": (1 <= self.cameras <= MAX_CAMERAS, f"1 to {MAX_CAMERAS}"),
            "width": (self.width >= 8, ">= 8"),
            "height": (self.height >= 8, ">= 8"),
            "fps": (self.fps > 0, "> 0"),
            "ego_speed": (0 <= self.ego_speed <= 30, "0 to 30 m/s"),
            "hfov_deg": (10 <= self.hfov_deg <= 150, "10 to 150 degrees"),
            "lidar_beams": (self.lidar_beams >= 1, ">= 1"),
            "lidar_azimuths": (self.lidar_azimuths >= 8, ">= 8"),
            "lidar_range": (self.lidar_range > 1, "> 1 m"),
            "moving_cars": (self.moving_cars >= 0, ">= 0"),
            "box_noise_trans": (self.box_noise_trans >= 0, ">= 0 m"),
            "box_noise_rot": (self.box_noise_rot >= 0, ">= 0 degrees"),
            "jpeg_quality": (1 <= self.jpeg_quality <= 100, "1 to 100"),
            "raycaster": (self.raycaster in RAYCASTER_CHOICES, " or ".join(RAYCASTER_CHOICES)),
            "device": (bool(_DEVICE.fullmatch(str(self.device))), "auto, cpu, cuda or cuda:N"),
        }
        for name, (ok, rule) in rules.items():
            if not ok:
                raise ValueError(f"SynthConfig.{name}={getattr(self, name)!r} is invalid: must be {rule}")

    @property
    def dt(self) -> float:
        """Seconds between consecutive frames."""
        return 1.0 / self.fps
