"""Procedural albedo textures of the synthetic street, evaluated at ray hits (numpy only).

Every texture is a function of the hit's position, so a surface point has one colour whatever
camera sees it (view-independent: what novel-view synthesis must be able to learn):

- static surfaces use the **street frame** position (x along the street, y left, z up, road at z=0);
- car surfaces use the car's **local box frame** (x forward, y left, z up, origin at the box
  centre), so the paint moves with the car.

Per-triangle ``params`` [4] carry what a texture needs beyond position (listed on ``Material``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Material(IntEnum):
    """Surface kinds; the comment gives the meaning of the triangle's ``params`` [4]."""

    GROUND = 0     # road half width, lane width, crosswalk start x, crosswalk length
    SIDEWALK = 1   # unused
    FACADE = 2     # window spacing, floor height, window grid origin (along the wall), building seed
    POLE = 3       # unused
    TRUNK = 4      # unused
    FOLIAGE = 5    # unused
    CAR_BODY = 6   # length, width, height of the car box
    CAR_CABIN = 7  # cabin rear x, cabin front x, cabin top z (local frame)
    WHEEL = 8      # wheel radius, |x| of the axles, z of the axles (local frame)


GROUND_MATERIALS = (Material.GROUND, Material.SIDEWALK)


@dataclass
class Surface:
    """Hit points to texture (N of them, all of one material when passed to a texture).

    Attributes:
        pos: [N, 3] street-frame position (static) or car-local position (car materials).
        normal: [N, 3] unit normal in the same frame as ``pos``, facing the viewer.
        colour: [N, 3] base colour of the triangle.
        params: [N, 4] material parameters (see ``Material``).
    """

    pos: np.ndarray
    normal: np.ndarray
    colour: np.ndarray
    params: np.ndarray

    def subset(self, keep: np.ndarray) -> "Surface":
        return Surface(self.pos[keep], self.normal[keep], self.colour[keep], self.params[keep])


def hash01(*ints: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random value in [0, 1) per integer tuple (elementwise, any shape)."""
    h = np.uint32(2166136261)
    for a in ints:
        h = (h ^ np.asarray(a).astype(np.int64).astype(np.uint32)) * np.uint32(16777619)
        h ^= h >> np.uint32(15)
    return (h & np.uint32(0xFFFFFF)).astype(np.float32) / np.float32(0x1000000)


class NoiseBank:
    """Two tileable smooth-noise images drawn from ``rng``, sampled in metres.

    ``fine`` has features of about 2 texels and ``coarse`` about 12; values in [0, 1].
    """

    SIZE = 256

    def __init__(self, rng: np.random.Generator):
        self.fine = self._smooth(rng.standard_normal((self.SIZE, self.SIZE)), 2.0)
        self.coarse = self._smooth(rng.standard_normal((self.SIZE, self.SIZE)), 12.0)

    @staticmethod
    def _smooth(white: np.ndarray, sigma: float) -> np.ndarray:
        # Gaussian blur in Fourier space keeps the texture tileable (wrap-around).
        k = np.fft.fftfreq(white.shape[0])
        g = np.exp(-2 * (np.pi * sigma) ** 2 * (k[:, None] ** 2 + k[None, :] ** 2))
        n = np.real(np.fft.ifft2(np.fft.fft2(white) * g))
        n = (n - n.mean()) / (n.std() * 4) + 0.5
        return np.clip(n, 0, 1).astype(np.float32)

    def sample(self, tex: np.ndarray, u: np.ndarray, v: np.ndarray, texel: float) -> np.ndarray:
        """Bilinear, wrapped lookup of ``tex`` at (u, v) metres with ``texel`` metres per texel."""
        u = np.asarray(u, np.float32) / np.float32(texel)
        v = np.asarray(v, np.float32) / np.float32(texel)
        u0, v0 = np.floor(u), np.floor(v)
        fu, fv = u - u0, v - v0
        n = self.SIZE
        i0, j0 = u0.astype(np.int64) % n, v0.astype(np.int64) % n
        i1, j1 = (i0 + 1) % n, (j0 + 1) % n
        top = tex[j0, i0] * (1 - fu) + tex[j0, i1] * fu
        bot = tex[j1, i0] * (1 - fu) + tex[j1, i1] * fu
        return top * (1 - fv) + bot * fv

    def triplanar(self, tex: np.ndarray, pos: np.ndarray, normal: np.ndarray, texel: float) -> np.ndarray:
        """3D noise on any surface: planar lookups blended by the normal's components."""
        w = np.abs(normal) + 1e-6
        w /= w.sum(axis=1, keepdims=True)
        x, y, z = pos.T
        return (w[:, 0] * self.sample(tex, y, z, texel) + w[:, 1] * self.sample(tex, x, z, texel)
                + w[:, 2] * self.sample(tex, x, y, texel))


def _mix(a: np.ndarray, b, m: np.ndarray) -> np.ndarray:
    """Where ``m`` [N] is True take ``b`` ([3] or [N, 3]) else ``a`` [N, 3]."""
    return np.where(m[:, None], np.broadcast_to(np.asarray(b, np.float32), a.shape), a)


def _ground(s: Surface, nb: NoiseBank) -> np.ndarray:
    x, y = s.pos[:, 0], s.pos[:, 1]
    road_half, lane, cross_x, cross_len = s.params.T
    grain = 0.8 + 0.4 * nb.sample(nb.fine, x, y, 0.05)
    patches = 0.9 + 0.2 * nb.sample(nb.coarse, x, y, 0.25)
    asphalt = np.array([0.27, 0.27, 0.29], np.float32) * (grain * patches)[:, None]
    grass = (np.array([0.22, 0.32, 0.12], np.float32)
             * (0.6 + 0.8 * nb.sample(nb.coarse, x, y, 0.08))[:, None])
    ay = np.abs(y)
    out = _mix(asphalt, grass, ay > road_half)
    yellow = (np.abs(ay - 0.15) < 0.06) & (ay < road_half)
    edge = np.abs(ay - lane) < 0.07
    zebra = (x > cross_x) & (x < cross_x + cross_len) & (ay < lane) & (np.mod(y, 1.0) < 0.5)
    out = _mix(out, [0.80, 0.66, 0.20], yellow)
    return _mix(out, [0.82, 0.82, 0.80], edge | zebra)


def _sidewalk(s: Surface, nb: NoiseBank) -> np.ndarray:
    x, y, z = s.pos.T
    tile = 0.6
    grout = (np.mod(x, tile) < 0.03) | (np.mod(y, tile) < 0.03)
    per_tile = 0.9 + 0.2 * hash01(np.floor(x / tile), np.floor(y / tile))
    tone = per_tile * (0.9 + 0.2 * nb.sample(nb.fine, x, y, 0.03))
    top = np.array([0.60, 0.59, 0.56], np.float32) * tone[:, None]
    top = _mix(top, [0.42, 0.41, 0.40], grout)
    curb = np.array([0.55, 0.55, 0.53], np.float32) * (0.85 + 0.3 * nb.sample(nb.fine, x, z, 0.05))[:, None]
    return _mix(top, curb, np.abs(s.normal[:, 2]) < 0.5)


def _facade(s: Surface, nb: NoiseBank) -> np.ndarray:
    x, y, z = s.pos.T
    spacing, floor_h, origin, seed = s.params.T
    along_x = np.abs(s.normal[:, 1]) >= np.abs(s.normal[:, 0])  # wall facing the street: u = x
    u = np.where(along_x, x, y) - origin
    fu, fz = np.mod(u / spacing, 1.0), np.mod(z / floor_h, 1.0)
    col, floor = np.floor(u / spacing), np.floor(z / floor_h)
    wall = s.colour * (0.9 + 0.2 * nb.sample(nb.fine, u, z, 0.04))[:, None]
    wall = _mix(wall, wall * 0.78, fz < 0.06)  # floor ledge
    shop = (floor == 0) & (fu > 0.08) & (fu < 0.92) & (fz > 0.12) & (fz < 0.78)
    upper = (floor > 0) & (fu > 0.28) & (fu < 0.72)
    window = shop | (upper & (fz > 0.30) & (fz < 0.80))
    sill = upper & (fz > 0.25) & (fz <= 0.30)
    glass_tone = 0.12 + 0.3 * hash01(col, floor, seed)
    glass = np.stack([glass_tone, glass_tone * 1.1, glass_tone * 1.3], 1)
    out = _mix(_mix(wall, glass, window), [0.78, 0.76, 0.72], sill)
    roof = np.array([0.30, 0.29, 0.28], np.float32) * (0.8 + 0.4 * nb.sample(nb.fine, x, y, 0.1))[:, None]
    return _mix(out, roof, s.normal[:, 2] > 0.5)


def _tinted_noise(lo: float, hi: float, texel: float, tex: str = "fine"):
    """Texture = base colour times triplanar noise in [lo, hi] (poles, trunks, foliage)."""

    def texture(s: Surface, nb: NoiseBank) -> np.ndarray:
        n = nb.triplanar(getattr(nb, tex), s.pos, s.normal, texel)
        return s.colour * (lo + (hi - lo) * n)[:, None]

    return texture


def _car_body(s: Surface, nb: NoiseBank) -> np.ndarray:
    x, y, z = s.pos.T
    length, width, height = s.params[:, 0], s.params[:, 1], s.params[:, 2]
    paint = s.colour * (0.92 + 0.16 * nb.triplanar(nb.fine, s.pos, s.normal, 0.05))[:, None]
    out = _mix(paint, paint * 0.45, z < -height / 2 + 0.42)  # dark lower trim
    front = (s.normal[:, 0] > 0.5) & (x > length / 2 - 0.02)
    rear = (s.normal[:, 0] < -0.5) & (x < -length / 2 + 0.02)
    lamp_row = z > -height / 2 + 0.62
    outer = np.abs(y) > width / 2 - 0.42
    plate = (np.abs(y) < 0.26) & (z < -height / 2 + 0.58) & (z > -height / 2 + 0.44)
    out = _mix(out, [0.95, 0.93, 0.82], front & lamp_row & outer)
    out = _mix(out, [0.08, 0.08, 0.09], front & lamp_row & ~outer)  # grille
    out = _mix(out, [0.70, 0.06, 0.05], rear & lamp_row & outer)
    return _mix(out, [0.90, 0.90, 0.88], (front | rear) & plate)


def _car_cabin(s: Surface, nb: NoiseBank) -> np.ndarray:
    x, z = s.pos[:, 0], s.pos[:, 2]
    x_rear, x_front, z_top = s.params[:, 0], s.params[:, 1], s.params[:, 2]
    mid = 0.5 * (x_rear + x_front)
    pillar = (x < x_rear + 0.12) | (x > x_front - 0.12) | (np.abs(x - mid) < 0.05) | (z > z_top - 0.06)
    side = np.abs(s.normal[:, 2]) < 0.5
    glass = np.array([0.07, 0.09, 0.12], np.float32) * (0.8 + 0.4 * nb.sample(nb.coarse, x, z, 0.05))[:, None]
    # Front/rear faces are all glass bar the roof edge; side faces have pillars.
    is_glass = side & (~pillar | (np.abs(s.normal[:, 0]) > 0.5) & (z <= z_top - 0.06))
    return _mix(s.colour, glass, is_glass)


def _wheel(s: Surface, nb: NoiseBank) -> np.ndarray:
    x, z = s.pos[:, 0], s.pos[:, 2]
    radius, axle_x, axle_z = s.params[:, 0], s.params[:, 1], s.params[:, 2]
    r = np.hypot(np.abs(x) - axle_x, z - axle_z)
    hub = (r < 0.55 * radius) & (np.abs(s.normal[:, 1]) > 0.5)
    tyre = np.full_like(s.colour, 0.06) * (0.8 + 0.4 * nb.sample(nb.fine, x, z, 0.02))[:, None]
    return _mix(tyre, [0.55, 0.56, 0.58], hub)


TEXTURES = {
    Material.GROUND: _ground,
    Material.SIDEWALK: _sidewalk,
    Material.FACADE: _facade,
    Material.POLE: _tinted_noise(0.85, 1.1, 0.1),
    Material.TRUNK: _tinted_noise(0.6, 1.3, 0.05),
    Material.FOLIAGE: _tinted_noise(0.55, 1.35, 0.12),
    Material.CAR_BODY: _car_body,
    Material.CAR_CABIN: _car_cabin,
    Material.WHEEL: _wheel,
}


def albedo(material: np.ndarray, surf: Surface, noise: NoiseBank) -> np.ndarray:
    """Albedo [N, 3] in [0, 1] of hits with ``material`` [N] (``Material`` ids)."""
    out = np.zeros((len(material), 3), np.float32)
    for mat, texture in TEXTURES.items():
        sel = np.flatnonzero(material == mat)
        if sel.size:
            out[sel] = texture(surf.subset(sel), noise)
    return np.clip(out, 0.0, 1.0)
