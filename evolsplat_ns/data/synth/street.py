"""Procedural street layout: road, sidewalks, buildings, poles, trees, parked and moving cars.

Everything is built in the **street frame**: x along the street (the ego drives towards +x),
y to the left, z up, road surface at z = 0, right-hand traffic. The ego lane is centred at
y = -1.75 and the oncoming lane at y = +1.75; parking strips, sidewalks and buildings follow
outwards on both sides. ``Street.street_to_world`` places the street in a random world (ENU)
frame, so written poses are not trivially aligned with the axes.

Cars carry Waymo-style boxes: local frame x forward, y left, z up, origin at the box centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evolsplat_ns.data.synth.config import SynthConfig
from evolsplat_ns.data.synth.mesh import TriMesh, box, cylinder, sphere, surface
from evolsplat_ns.data.synth.textures import Material, NoiseBank

LANE_WIDTH = 3.5
EGO_LANE_Y = -LANE_WIDTH / 2
ROAD_HALF_WIDTH = 6.0       # lanes plus a parking strip on each side
PARKING_Y = 4.8             # |y| of parked car centres
SIDEWALK_OUTER = 9.0        # |y| where sidewalks end and building plots begin
CURB_HEIGHT = 0.15
GROUND_MARGIN = 600.0       # the ground plane reaches this far past the street (horizon)
BEHIND_EGO = 50.0           # street length kept behind the ego's start
AHEAD_OF_EGO = 160.0        # and ahead of its end

FACADE_COLOURS = np.array([
    [0.78, 0.72, 0.60], [0.62, 0.33, 0.25], [0.70, 0.70, 0.68], [0.85, 0.84, 0.80],
    [0.55, 0.60, 0.66], [0.80, 0.68, 0.50], [0.50, 0.45, 0.40], [0.72, 0.78, 0.70],
], np.float32)
CAR_COLOURS = np.array([
    [0.90, 0.90, 0.90], [0.08, 0.08, 0.09], [0.60, 0.62, 0.64], [0.65, 0.08, 0.07],
    [0.10, 0.22, 0.55], [0.30, 0.32, 0.34], [0.12, 0.30, 0.18], [0.85, 0.70, 0.15],
], np.float32)


def yaw_matrix(yaw: float, translation=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Rigid 4x4 rotating by ``yaw`` about +z, then translating."""
    c, s = np.cos(yaw), np.sin(yaw)
    T = np.eye(4)
    T[:2, :2] = [[c, -s], [s, c]]
    T[:3, 3] = translation
    return T


@dataclass
class Car:
    """One car: a Waymo-style box moving at constant velocity (``speed`` 0 = parked).

    Attributes:
        size: [3] box length, width, height in metres.
        start: [2] street-frame xy of the box centre at time 0.
        heading: yaw of the car's +x in the street frame (radians).
        speed: metres per second along the heading.
        mesh: the car in its local box frame (x forward, y left, z up, origin at box centre).
    """

    size: np.ndarray
    start: np.ndarray
    heading: float
    speed: float
    mesh: TriMesh

    @property
    def moving(self) -> bool:
        return self.speed > 0

    @property
    def velocity(self) -> np.ndarray:
        """[3] street-frame velocity in m/s."""
        return self.speed * np.array([np.cos(self.heading), np.sin(self.heading), 0.0])

    def pose(self, time: float) -> np.ndarray:
        """Car-local -> street frame [4, 4] at ``time`` seconds."""
        xy = self.start + self.velocity[:2] * time
        return yaw_matrix(self.heading, (xy[0], xy[1], self.size[2] / 2))


@dataclass
class EgoPath:
    """The ego's rear axle path: constant speed along +x with a gentle lane-keeping sway."""

    speed: float
    sway: float        # metres of lateral sway amplitude
    wavelength: float  # metres per sway period
    phase: float

    def pose(self, time: float) -> np.ndarray:
        """Vehicle -> street frame [4, 4] (Waymo vehicle frame: x forward, y left, z up)."""
        x = self.speed * time
        k = 2 * np.pi / self.wavelength
        y = EGO_LANE_Y + self.sway * np.sin(k * x + self.phase)
        heading = np.arctan(self.sway * k * np.cos(k * x + self.phase))
        return yaw_matrix(heading, (x, y, 0.0))


@dataclass
class Street:
    """A generated street: static geometry, cars, ego path, lighting and the world placement.

    Attributes:
        static: street-frame geometry that never moves (parked cars included).
        cars: every car; triangles of ``static`` and car meshes index this list.
        ego: the ego vehicle's path.
        sun: [3] unit vector towards the sun, street frame.
        street_to_world: [4, 4] street frame -> world (ENU) frame of the written poses.
        noise: the texture noise of this street.
    """

    static: TriMesh
    cars: list[Car]
    ego: EgoPath
    sun: np.ndarray
    street_to_world: np.ndarray
    noise: NoiseBank

    def moving_mesh(self, time: float) -> TriMesh:
        """Street-frame triangles of the moving cars at ``time`` seconds."""
        return TriMesh.concat([c.mesh.transformed(c.pose(time)) for c in self.cars if c.moving])

    def car_poses(self, time: float) -> np.ndarray:
        """[K, 4, 4] car-local -> street frame of every car at ``time`` seconds."""
        return np.stack([c.pose(time) for c in self.cars]) if self.cars else np.zeros((0, 4, 4))


# ----------------------------------------------------------------------------- cars


def car_mesh(size: np.ndarray, colour: np.ndarray, index: int) -> TriMesh:
    """A car of ``size`` (l, w, h) in its local box frame: body, glass cabin, four wheels."""
    length, width, height = size
    ground = -height / 2
    body_top = ground + 0.95
    x_rear, x_front = -length / 2 + 0.22 * length, length / 2 - 0.33 * length
    wheel_r, axle_x, axle_z = 0.33, length / 2 - 0.85, ground + 0.33
    parts = [
        surface(*box((-length / 2, -width / 2, ground + 0.25), (length / 2, width / 2, body_top)),
                Material.CAR_BODY, colour, (length, width, height, 0), index),
        surface(*box((x_rear, -width / 2 + 0.1, body_top), (x_front, width / 2 - 0.1, height / 2)),
                Material.CAR_CABIN, colour, (x_rear, x_front, height / 2, 0), index),
    ]
    for sx in (-1, 1):
        for sy in (-1, 1):
            centre = (sx * axle_x, sy * (width / 2 - 0.12), axle_z)
            parts.append(surface(*cylinder(wheel_r, 0.22, centre, axis="y"), Material.WHEEL,
                                 (0.06, 0.06, 0.06), (wheel_r, axle_x, axle_z, 0), index))
    return TriMesh.concat(parts)


def _new_car(rng: np.random.Generator, index: int, start, heading: float, speed: float) -> Car:
    size = np.array([rng.uniform(4.0, 4.9), rng.uniform(1.75, 1.95), rng.uniform(1.45, 1.65)])
    colour = np.clip(CAR_COLOURS[rng.integers(len(CAR_COLOURS))] + rng.normal(0, 0.03, 3), 0, 1)
    return Car(size, np.asarray(start, np.float64), heading, speed, car_mesh(size, colour, index))


def _moving_cars(rng: np.random.Generator, cfg: SynthConfig, travel: float, first: int) -> list[Car]:
    """Cars ahead in the ego lane (faster than the ego) and oncoming cars in the other lane.

    In each lane the car further along its direction of travel is the faster one, so gaps only
    grow and no car ever runs into another or into the ego.
    """
    n_same = cfg.moving_cars // 2
    n_oncoming = cfg.moving_cars - n_same
    cars: list[Car] = []
    x = 10.0 + rng.uniform(0, 10)  # ego-lane cars start ahead of the ego's bumper
    for speed in np.sort(cfg.ego_speed + rng.uniform(0.5, 3.0, n_same)):
        car = _new_car(rng, first + len(cars), (0, EGO_LANE_Y), 0.0, float(speed))
        car.start[0] = x + car.size[0] / 2
        x += car.size[0] + rng.uniform(8, 25)
        cars.append(car)
    x = rng.uniform(15, 40)
    for speed in np.sort(rng.uniform(6, 12, n_oncoming))[::-1]:
        car = _new_car(rng, first + len(cars), (0, -EGO_LANE_Y), np.pi, float(speed))
        car.start[0] = x + car.size[0] / 2
        x += car.size[0] + rng.uniform(8, 30) + travel / max(n_oncoming, 1)
        cars.append(car)
    return cars


def _parked_cars(rng: np.random.Generator, x_lo: float, x_hi: float, keep_clear: tuple[float, float],
                 first: int) -> list[Car]:
    """Static cars along both parking strips, nose in the direction of traffic, never on the crosswalk."""
    cars: list[Car] = []
    for side in (-1, 1):
        x = x_lo + rng.uniform(0, 5)
        while x < x_hi:
            if rng.random() < 0.55:
                heading = 0.0 if side < 0 else np.pi
                car = _new_car(rng, first + len(cars), (0, side * PARKING_Y), heading, 0.0)
                length = car.size[0]
                if not (x + length > keep_clear[0] and x < keep_clear[1]):
                    car.start[0] = x + length / 2
                    cars.append(car)
                x += length + rng.uniform(1.0, 3.0)
            else:
                x += rng.uniform(4, 10)
    return cars


# ----------------------------------------------------------------------------- static scenery


def _ground_and_sidewalks(x_lo: float, x_hi: float, crosswalk: tuple[float, float]) -> list[TriMesh]:
    lo, hi = x_lo - GROUND_MARGIN, x_hi + GROUND_MARGIN
    quad = np.array([[lo, -GROUND_MARGIN, 0], [hi, -GROUND_MARGIN, 0], [hi, GROUND_MARGIN, 0],
                     [lo, GROUND_MARGIN, 0]])
    road = (ROAD_HALF_WIDTH, LANE_WIDTH, crosswalk[0], crosswalk[1] - crosswalk[0])
    meshes = [surface(quad, [[0, 1, 2], [0, 2, 3]], Material.GROUND, (1, 1, 1), road)]
    for side in (-1, 1):
        y0, y1 = sorted((side * ROAD_HALF_WIDTH, side * SIDEWALK_OUTER))
        meshes.append(surface(*box((lo, y0, 0), (hi, y1, CURB_HEIGHT)), Material.SIDEWALK, (1, 1, 1)))
    return meshes


def _buildings(rng: np.random.Generator, x_lo: float, x_hi: float) -> list[TriMesh]:
    """Rows of box buildings on both sides with window grids, random widths, heights and alleys."""
    meshes = []
    for side in (-1, 1):
        x = x_lo
        while x < x_hi:
            if rng.random() < 0.15:  # alley
                x += rng.uniform(2, 5)
                continue
            width, depth = rng.uniform(8, 22), rng.uniform(8, 14)
            floor_h = rng.uniform(3.0, 3.6)
            height = rng.integers(2, 9) * floor_h + rng.uniform(0.3, 1.0)
            near = SIDEWALK_OUTER + rng.uniform(0, 2)
            y0, y1 = sorted((side * near, side * (near + depth)))
            colour = np.clip(FACADE_COLOURS[rng.integers(len(FACADE_COLOURS))] + rng.normal(0, 0.04, 3), 0, 1)
            params = (rng.uniform(2.4, 3.6), floor_h, x, rng.integers(1 << 20))
            meshes.append(surface(*box((x, y0, 0), (x + width, y1, height)), Material.FACADE, colour, params))
            x += width
    return meshes


def _poles_and_trees(rng: np.random.Generator, x_lo: float, x_hi: float) -> list[TriMesh]:
    """Street lights every 20-30 m on alternating sides; trees on the sidewalks between them."""
    meshes = []
    grey = (0.42, 0.43, 0.46)
    x, side, poles = x_lo + rng.uniform(0, 10), 1, []
    while x < x_hi:
        y = side * 6.5
        meshes.append(surface(*cylinder(0.09, 6.5, (x, y, 3.25)), Material.POLE, grey))
        y_arm = sorted((y, side * 5.0))
        meshes.append(surface(*box((x - 0.05, y_arm[0], 6.25), (x + 0.05, y_arm[1], 6.35)), Material.POLE, grey))
        meshes.append(surface(*box((x - 0.15, side * 5.0 - 0.3, 6.1), (x + 0.15, side * 5.0 + 0.3, 6.25)),
                              Material.POLE, (0.9, 0.9, 0.8)))
        poles.append((x, side))
        x, side = x + rng.uniform(20, 30), -side
    for side in (-1, 1):
        x = x_lo + rng.uniform(0, 8)
        while x < x_hi:
            if all(abs(x - px) > 2.5 or ps != side for px, ps in poles) and rng.random() < 0.7:
                meshes += _tree(rng, x, side * rng.uniform(7.4, 8.0))
            x += rng.uniform(7, 15)
    return meshes


def _tree(rng: np.random.Generator, x: float, y: float) -> list[TriMesh]:
    trunk_h = rng.uniform(2.2, 3.2)
    trunk = surface(*cylinder(rng.uniform(0.12, 0.2), trunk_h, (x, y, CURB_HEIGHT + trunk_h / 2), resolution=8),
                    Material.TRUNK, (0.32, 0.22, 0.13))
    green = np.clip(np.array([0.20, 0.38, 0.12]) + rng.normal(0, 0.04, 3), 0, 1)
    crowns = []
    for _ in range(rng.integers(1, 3)):
        r = rng.uniform(1.1, 1.8)
        centre = (x + rng.uniform(-0.4, 0.4), y + rng.uniform(-0.3, 0.3), CURB_HEIGHT + trunk_h + 0.6 * r)
        crowns.append(surface(*sphere(r, centre, resolution=8), Material.FOLIAGE, green))
    return [trunk, *crowns]


# ----------------------------------------------------------------------------- the street


def build_street(cfg: SynthConfig, rng: np.random.Generator) -> Street:
    """Draw a street for ``cfg`` from ``rng`` (all randomness of a scene comes from ``rng``)."""
    travel = cfg.ego_speed * (cfg.frames - 1) * cfg.dt
    x_lo, x_hi = -BEHIND_EGO, travel + AHEAD_OF_EGO
    noise = NoiseBank(rng)
    cross_x = rng.uniform(15, travel + 60)
    crosswalk = (cross_x, cross_x + 4.0)
    moving = _moving_cars(rng, cfg, travel, first=0)
    parked = _parked_cars(rng, x_lo, x_hi, crosswalk, first=len(moving))
    scenery = (_ground_and_sidewalks(x_lo, x_hi, crosswalk) + _buildings(rng, x_lo, x_hi)
               + _poles_and_trees(rng, x_lo, x_hi))
    static = TriMesh.concat(scenery + [c.mesh.transformed(c.pose(0.0)) for c in parked])
    ego = EgoPath(cfg.ego_speed, sway=rng.uniform(0.05, 0.25), wavelength=rng.uniform(40, 80),
                  phase=rng.uniform(0, 2 * np.pi))
    elevation, azimuth = np.radians(rng.uniform(35, 60)), rng.uniform(0, 2 * np.pi)
    sun = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])
    world = yaw_matrix(rng.uniform(-np.pi, np.pi), (*rng.uniform(-2000, 2000, 2), rng.uniform(-20, 50)))
    return Street(static, moving + parked, ego, sun, world, noise)
