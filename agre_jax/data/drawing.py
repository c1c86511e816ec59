"""Vectorised numpy drawing for the generated datasets (`spurious_shapes`, `pretrain_shapes`).

Everything works on a batch of n images at once and draws its randomness from the generator it
is given, in a fixed order, so that a builder's pixels are a function of its seeds alone.
Shapes are drawn as antialiased coverage from signed distances (negative inside, in pixels):
`coverage(d) = clip(0.5 - d, 0, 1)`. Images are float RGB in 0-255 until `finish` adds noise
and rounds them to uint8.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] matrix that upsamples a coarse grid bilinearly (pixel-centre aligned)."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m


def smooth_field(rng: np.random.Generator, n: int, grid: int, side: int) -> np.ndarray:
    """Smooth random fields [n, side, side] in [0, 1] from a coarse uniform grid."""
    up = bilinear_matrix(side, grid)
    coarse = rng.random((n, grid, grid))
    return up @ coarse @ up.T


def pixel_grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx), each [side, side], in pixels."""
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    return yy, xx


def blob_mix(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    """Sharp-edged random blobs: mixing weights [n, side, side, 1] in [0, 1] between two
    colours (spurious_shapes' 'land' texture)."""
    blobs = 0.7 * smooth_field(rng, n, 5, side) + 0.3 * smooth_field(rng, n, 11, side)
    return np.clip((blobs - 0.5) * 4 + 0.5, 0, 1)[..., None]


def wave_mix(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    """Wavy stripes of random period, tilt and waviness: mixing weights [n, side, side, 1] in
    [0, 1] between two colours (spurious_shapes' 'water' texture)."""
    s = side / 32
    period = rng.uniform(5, 9, (n, 1, 1)) * s
    tilt = rng.uniform(-0.4, 0.4, (n, 1, 1))
    amp = rng.uniform(0.8, 2.5, (n, 1, 1)) * s
    freq = rng.uniform(1, 3, (n, 1, 1)) * 2 * np.pi / side
    phase = rng.uniform(0, 2 * np.pi, (n, 2, 1, 1))
    yy, xx = pixel_grid(side)
    along = xx * np.cos(tilt) + yy * np.sin(tilt)
    across = -xx * np.sin(tilt) + yy * np.cos(tilt)
    wave = across + amp * np.sin(freq * along + phase[:, 0])
    return (0.5 + 0.5 * np.sin(2 * np.pi * wave / period + phase[:, 1]))[..., None]


def checker_mix(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    """A rotated checkerboard of random cell size (4-10 px at 32 px), softened over one
    pixel: mixing weights [n, side, side, 1] in [0, 1]."""
    cell = rng.uniform(4, 10, (n, 1, 1)) * side / 32
    theta = rng.uniform(0, np.pi / 2, (n, 1, 1))
    offset = rng.uniform(0, 1, (n, 2, 1, 1))
    yy, xx = pixel_grid(side)
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / cell + offset[:, 0]
    v = (-xx * np.sin(theta) + yy * np.cos(theta)) / cell + offset[:, 1]
    return (0.5 + 0.5 * np.clip(4 * np.sin(np.pi * u) * np.sin(np.pi * v), -1, 1))[..., None]


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[n] hue, saturation, value in [0, 1] -> [n, 3] RGB in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def random_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 3] saturated colours in 0-255: uniform hue, saturation 0.4-1, value 0.5-1."""
    return 255 * hsv_to_rgb(rng.random(n), rng.uniform(0.4, 1, n), rng.uniform(0.5, 1, n))


def box_sdf(qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    """Signed distance to an axis-aligned box, given |p| - half_size per axis."""
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def polygon_sdf(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Signed distance (exact inside, a lower bound outside near corners) to a convex polygon
    whose `vertices` [k, 2] (u, v) run counter-clockwise: the largest distance past an edge."""
    a, b = vertices, np.roll(vertices, -1, axis=0)
    edge = b - a
    normal = np.stack([edge[:, 1], -edge[:, 0]], axis=1) / np.hypot(*edge.T)[:, None]
    offset = np.sum(normal * a, axis=1)
    d = [normal[i, 0] * u + normal[i, 1] * v - offset[i] for i in range(len(vertices))]
    return np.max(d, axis=0)


def regular_polygon(k: int, radius: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    """Vertices [k, 2] of a regular k-gon of circumradius `radius`, counter-clockwise."""
    angles = phase + 2 * np.pi * np.arange(k) / k
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def placed_frames(
    rng: np.random.Generator, n: int, side: int, radius: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Random positions (the whole disk of `radius` [n] px inside the image) and rotations:
    each image's pixel coordinates (u, v), [n, side, side], in the shape's rotated frame."""
    cx = rng.uniform(radius, side - radius)
    cy = rng.uniform(radius, side - radius)
    theta = rng.uniform(0, 2 * np.pi, n)
    yy, xx = pixel_grid(side)
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    return dx * cos + dy * sin, -dx * sin + dy * cos


def coverage(distance: np.ndarray) -> np.ndarray:
    """Antialiased coverage in [0, 1] of a signed distance in pixels."""
    return np.clip(0.5 - distance, 0, 1)


def finish(image: np.ndarray, rng: np.random.Generator, noise_std: float) -> np.ndarray:
    """Float images in 0-255 plus Gaussian pixel noise of `noise_std`, rounded to uint8."""
    image = image + rng.normal(0, noise_std, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


RENDER_CHUNK = 512  # images rendered per generator; part of the seed derivation, so fixed.


def render_split(
    seed: int,
    split_code: int,
    counts: np.ndarray,
    num_places: int,
    side: int,
    render: Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray],
) -> dict[str, np.ndarray]:
    """A generated split as arrays: `counts[g]` examples of group g = num_places * label +
    place, shuffled, rendered RENDER_CHUNK at a time by `render(rng, labels, places)` with a
    generator per chunk seeded by (seed, split_code, 1, chunk).

    Returns:
      image [n, side, side, 3] uint8, label, place, group [n].
    """
    groups = np.repeat(np.arange(len(counts)), counts)
    groups = np.random.default_rng([seed, split_code, 0]).permutation(groups)
    labels, places = groups // num_places, groups % num_places
    images = np.empty((groups.size, side, side, 3), np.uint8)
    for c, start in enumerate(range(0, groups.size, RENDER_CHUNK)):
        sl = slice(start, start + RENDER_CHUNK)
        rng = np.random.default_rng([seed, split_code, 1, c])
        images[sl] = render(rng, labels[sl], places[sl])
    return {"image": images, "label": labels, "place": places, "group": groups}
