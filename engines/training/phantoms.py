"""Synthetic musculoskeletal radiograph phantoms, with ground truth, and a DICOM writer.

Why: no musculoskeletal radiograph data set can be downloaded here, yet the demo model must be trained and
the node must be tested end to end on believable images. The phantoms are projection images computed from
simple 3-D shapes (tapered capsules and ellipsoids): each pixel is the line integral of attenuation through
soft tissue, cortical shells and trabecular bone, turned into a 12-bit detector value with blur and noise.

Views: ``hand`` (PA: radius/ulna, carpals, metacarpals, phalanges), ``knee`` (AP: femoral condyles,
tibial plateau, fibular head, patella) and ``long_bone`` (AP femur, or a two-bone leg / forearm).

Optional planted findings, each with a pixel mask (ground truth):

- ``fracture``: a gap line through a shaft cortex, with a small displacement of the distal fragment;
- ``lytic``: a punched-out lesion that removes bone inside a sphere (with a thin sclerotic rim);
- ``sclerotic``: a dense blotchy focus inside bone;
- ``narrowing``: joint-space narrowing graded 0-4 (a Kellgren-Lawrence stand-in: narrower gap, then
  osteophytes from grade 2, subchondral sclerosis from grade 3).

Everything is seeded and deterministic: ``generate(kind, seed, ...)`` returns the same pixels and masks for
the same arguments. Images are generated at about 512 px on the long side (the model sees 224 px).
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
from scipy import ndimage

Kind = Literal["hand", "knee", "long_bone"]
KINDS: tuple[str, ...] = ("hand", "knee", "long_bone")
FINDINGS: tuple[str, ...] = ("fracture", "lytic", "sclerotic")

# Linear attenuation (1/mm), roughly in the ratios of soft tissue, cortical bone and trabecular bone at
# CR energies. Only the ratios matter after the detector curve.
MU_SOFT = 0.007
MU_CORTEX = 0.060
MU_TRABECULAR = 0.030
MU_MARROW = 0.004

MAX_STORED = 4095  # 12 bits


# ---------------------------------------------------------------------------------------------------------
# Data classes
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Finding:
    """One planted finding; ``mask`` marks its pixels (bool, image shape)."""

    kind: str  # fracture | lytic | sclerotic | narrowing
    mask: np.ndarray
    bone: str = ""
    grade: int | None = None  # narrowing only
    size_mm: float = 0.0

    @property
    def bbox(self) -> tuple[int, int, int, int] | None:
        """(row0, col0, row1, col1), exclusive ends, or None when the mask is empty."""
        rows, cols = np.nonzero(self.mask)
        if rows.size == 0:
            return None
        return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


@dataclass
class Phantom:
    """A generated radiograph: 12-bit MONOCHROME2 pixels (bone bright), ground truth and header facts."""

    pixels: np.ndarray  # uint16 [rows, columns], values 0..4095
    kind: str
    seed: int
    body_part: str  # DICOM Body Part Examined: HAND, KNEE, FEMUR, LEG, FOREARM
    laterality: str  # "L" or "R"
    view: str  # DICOM View Position: PA or AP
    pixel_spacing: tuple[float, float]  # (row, column) mm
    findings: list[Finding] = field(default_factory=list)

    @property
    def lesion_mask(self) -> np.ndarray:
        """Union of the focal findings (fracture, lytic, sclerotic): what an error map should point at."""
        mask = np.zeros(self.pixels.shape, dtype=bool)
        for finding in self.findings:
            if finding.kind in FINDINGS:
                mask |= finding.mask
        return mask

    @property
    def labels(self) -> dict[str, int]:
        """Image-level labels for heads: 0/1 per focal finding, ``lesion`` (lytic or sclerotic), grade 0-4."""
        kinds = {f.kind for f in self.findings}
        grade = max((f.grade or 0 for f in self.findings if f.kind == "narrowing"), default=0)
        return {
            "fracture": int("fracture" in kinds),
            "lytic": int("lytic" in kinds),
            "sclerotic": int("sclerotic" in kinds),
            "lesion": int(bool(kinds & {"lytic", "sclerotic"})),
            "narrowing": grade,
        }


# ---------------------------------------------------------------------------------------------------------
# Geometry primitives: chord lengths (mm) through 3-D shapes, evaluated on a pixel grid
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Capsule:
    """A tapered capsule from p0 to p1 (pixel (x, y)), radius r0 -> r1 in pixels: a bone shaft or a finger."""

    p0: tuple[float, float]
    p1: tuple[float, float]
    r0: float
    r1: float

    def bbox(self, pad: float = 0.0) -> tuple[float, float, float, float]:
        r = max(self.r0, self.r1) + pad
        xs, ys = (self.p0[0], self.p1[0]), (self.p0[1], self.p1[1])
        return min(xs) - r, min(ys) - r, max(xs) + r, max(ys) + r

    def chord(self, xx: np.ndarray, yy: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Chord length (pixels) through the capsule with radii scaled by ``scale``, and the axial position t."""
        (x0, y0), (x1, y1) = self.p0, self.p1
        dx, dy = x1 - x0, y1 - y0
        length2 = max(dx * dx + dy * dy, 1e-6)
        t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / length2, 0.0, 1.0)
        px, py = x0 + t * dx, y0 + t * dy
        d2 = (xx - px) ** 2 + (yy - py) ** 2
        r = (self.r0 + t * (self.r1 - self.r0)) * scale
        return 2.0 * np.sqrt(np.maximum(r * r - d2, 0.0)), t

    def shifted(self, dx: float, dy: float) -> "Capsule":
        return Capsule((self.p0[0] + dx, self.p0[1] + dy), (self.p1[0] + dx, self.p1[1] + dy), self.r0, self.r1)

    def point(self, t: float) -> tuple[float, float]:
        return self.p0[0] + t * (self.p1[0] - self.p0[0]), self.p0[1] + t * (self.p1[1] - self.p0[1])

    def radius(self, t: float) -> float:
        return self.r0 + t * (self.r1 - self.r0)

    @property
    def direction(self) -> tuple[float, float]:
        dx, dy = self.p1[0] - self.p0[0], self.p1[1] - self.p0[1]
        n = math.hypot(dx, dy) or 1.0
        return dx / n, dy / n


@dataclass
class Ellipsoid:
    """An ellipsoid with in-plane semi-axes a (along ``angle``), b and depth semi-axis c (pixels)."""

    centre: tuple[float, float]
    a: float
    b: float
    c: float
    angle: float = 0.0  # radians

    def bbox(self, pad: float = 0.0) -> tuple[float, float, float, float]:
        r = max(self.a, self.b) + pad
        return self.centre[0] - r, self.centre[1] - r, self.centre[0] + r, self.centre[1] + r

    def chord(self, xx: np.ndarray, yy: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        u = (xx - self.centre[0]) * cos + (yy - self.centre[1]) * sin
        v = -(xx - self.centre[0]) * sin + (yy - self.centre[1]) * cos
        q = (u / (self.a * scale)) ** 2 + (v / (self.b * scale)) ** 2
        chord = 2.0 * self.c * scale * np.sqrt(np.maximum(1.0 - q, 0.0))
        return chord, np.full_like(chord, 0.5)

    def shifted(self, dx: float, dy: float) -> "Ellipsoid":
        return Ellipsoid((self.centre[0] + dx, self.centre[1] + dy), self.a, self.b, self.c, self.angle)


Shape = Capsule | Ellipsoid


@dataclass
class Bone:
    """One bone: shapes whose union is the bone, a cortical fraction, and how much of it is trabecular.

    ``trabecular_ends`` makes the medulla trabecular near the capsule ends (metaphysis / epiphysis) and
    marrow-filled mid-shaft, as in real long bones; short bones (carpals, condyles) are trabecular throughout.
    """

    name: str
    shapes: list[Shape]
    cortex: float = 0.25  # cortical thickness as a fraction of the radius
    trabecular_ends: bool = True
    shaft: int | None = 0  # index of the shape that is the shaft (fracture target), None for short bones


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


class _Canvas:
    """Accumulates soft-tissue and bone path lengths on the pixel grid (each shape only over its box)."""

    def __init__(self, rows: int, columns: int, mm_per_px: float) -> None:
        self.rows, self.columns, self.mm = rows, columns, mm_per_px
        self.yy, self.xx = np.mgrid[0:rows, 0:columns].astype(np.float32)
        self.soft = np.zeros((rows, columns), np.float32)  # mm of soft tissue
        self.cortex = np.zeros((rows, columns), np.float32)  # mm of cortical bone
        self.medulla = np.zeros((rows, columns), np.float32)  # mm of medulla, weighted by trabecular density
        self.bone_outer = np.zeros((rows, columns), np.float32)  # bone footprint (mm of whole bone)

    def window(self, box: tuple[float, float, float, float]) -> tuple[slice, slice] | None:
        x0, y0, x1, y1 = box
        c0, c1 = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)) + 1, self.columns)
        r0, r1 = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)) + 1, self.rows)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def add_soft(self, shapes: Sequence[Shape]) -> None:
        """Soft tissue: the union (max chord) of the given shapes, added to what is already there."""
        union = np.zeros_like(self.soft)
        for shape in shapes:
            win = self.window(shape.bbox())
            if win is None:
                continue
            chord, _ = shape.chord(self.xx[win], self.yy[win])
            np.maximum(union[win], chord * self.mm, out=union[win])
        self.soft += union

    def bone_paths(self, bone: Bone) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[slice, slice]] | None:
        """(outer, inner, trabecular weight) for one bone over its window, as the union of its shapes."""
        boxes = [s.bbox() for s in bone.shapes]
        box = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
        win = self.window(box)
        if win is None:
            return None
        xx, yy = self.xx[win], self.yy[win]
        outer = np.zeros(xx.shape, np.float32)
        inner = np.zeros(xx.shape, np.float32)
        trab = np.zeros(xx.shape, np.float32)
        for shape in bone.shapes:
            chord_out, t = shape.chord(xx, yy)
            chord_in, _ = shape.chord(xx, yy, scale=1.0 - bone.cortex)
            if isinstance(shape, Capsule) and bone.trabecular_ends:
                # Trabecular near the ends of a shaft, marrow in its middle.
                weight = np.clip(1.0 - np.minimum(t, 1.0 - t) / 0.22, 0.0, 1.0) ** 1.5
            else:
                weight = np.ones_like(t)
            np.maximum(outer, chord_out, out=outer)
            take = chord_in > inner
            trab = np.where(take, weight, trab)
            np.maximum(inner, chord_in, out=inner)
        return outer * self.mm, inner * self.mm, trab, win

    def add_bone(self, bone: Bone, texture: np.ndarray, density: float = 1.0) -> None:
        paths = self.bone_paths(bone)
        if paths is None:
            return
        outer, inner, trab, win = paths
        medulla_density = MU_MARROW + (MU_TRABECULAR - MU_MARROW) * trab * (1.0 + texture[win])
        self.cortex[win] += (outer - inner) * density
        self.medulla[win] += inner * medulla_density * density / MU_TRABECULAR
        self.bone_outer[win] += outer

    def attenuation(self) -> np.ndarray:
        return MU_SOFT * self.soft + MU_CORTEX * self.cortex + MU_TRABECULAR * self.medulla


def _trabecular_texture(rng: np.random.Generator, shape: tuple[int, int], amplitude: float) -> np.ndarray:
    """Band-pass noise: a stand-in for the trabecular pattern (fine, moderately contrasted)."""
    white = rng.standard_normal(shape).astype(np.float32)
    # Fine enough (about 1-2 px at 512) to average out mostly at 224 px: a coarse, contrasted texture is
    # unpredictable for any MAE and would dominate its error map over real findings.
    band = ndimage.gaussian_filter(white, 0.9) - ndimage.gaussian_filter(white, 2.0)
    band /= band.std() + 1e-6
    return np.clip(amplitude * band, -0.9, 0.9)


def _detector(attenuation: np.ndarray, rng: np.random.Generator, mm_per_px: float) -> np.ndarray:
    """Line integral -> 12-bit MONOCHROME2 value: a log-like detector curve, heel effect, blur, noise."""
    rows, columns = attenuation.shape
    gain = rng.uniform(0.85, 1.15)
    air = rng.uniform(120.0, 380.0)
    top = rng.uniform(3500.0, 3950.0)
    signal = 1.0 - np.exp(-attenuation * gain / 2.0)
    # Heel effect: a gentle intensity gradient along the anode-cathode axis.
    heel = 1.0 + rng.uniform(-0.04, 0.04) * np.linspace(-1, 1, rows, dtype=np.float32)[:, None]
    image = air + (top - air) * signal * heel
    image = ndimage.gaussian_filter(image, 0.6 / max(mm_per_px, 0.2))  # detector unsharpness ~0.6 mm
    sigma = rng.uniform(8.0, 22.0)
    noise = rng.standard_normal((rows, columns)).astype(np.float32)
    noise = ndimage.gaussian_filter(noise, 0.7) * 1.8  # slightly correlated quantum noise
    image = image + sigma * noise * (0.6 + 0.8 * signal)
    return np.clip(np.rint(image), 0, MAX_STORED).astype(np.uint16)


# ---------------------------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------------------------


def _rot(point: tuple[float, float], centre: tuple[float, float], angle: float) -> tuple[float, float]:
    c, s = math.cos(angle), math.sin(angle)
    x, y = point[0] - centre[0], point[1] - centre[1]
    return centre[0] + c * x - s * y, centre[1] + s * x + c * y


@dataclass
class _Anatomy:
    bones: list[Bone]
    soft: list[Shape]
    joints: list[tuple[str, str, tuple[float, float]]]  # (bone a, bone b, joint centre) for narrowing
    body_part: str


def _hand(rng: np.random.Generator, rows: int, columns: int, mm: float, gap_scale: float) -> _Anatomy:
    """PA hand: distal radius and ulna, a carpal cluster, five rays of metacarpals and phalanges."""
    px = 1.0 / mm
    cx = columns * rng.uniform(0.46, 0.54)
    wrist_y = rows * rng.uniform(0.80, 0.86)
    tilt = rng.uniform(-0.12, 0.12)
    size = rng.uniform(0.9, 1.08)
    bones: list[Bone] = []
    soft: list[Shape] = []
    joints: list[tuple[str, str, tuple[float, float]]] = []

    def r(p: tuple[float, float]) -> tuple[float, float]:
        return _rot(p, (cx, wrist_y), tilt)

    # Forearm bones entering from the bottom edge.
    radius_x, ulna_x = cx - 14 * px * size, cx + 17 * px * size
    bones.append(Bone("radius", [Capsule(r((radius_x, rows + 40)), r((radius_x - 2 * px, wrist_y + 10 * px)), 9 * px * size, 13 * px * size)]))
    bones.append(Bone("ulna", [Capsule(r((ulna_x, rows + 40)), r((ulna_x, wrist_y + 14 * px)), 7 * px * size, 8 * px * size)]))
    soft.append(Capsule(r((cx, rows + 60)), r((cx, wrist_y - 10 * px)), 34 * px * size, 36 * px * size))
    # Carpals: eight small ellipsoids in two rows.
    carpal_y0 = wrist_y - 4 * px * size
    for row_index, count in enumerate((4, 4)):
        for k in range(count):
            x = cx + (k - 1.5) * 10.5 * px * size + rng.normal(0, 0.8) * px
            y = carpal_y0 - row_index * 11 * px * size + rng.normal(0, 0.8) * px
            a = rng.uniform(4.5, 6.0) * px * size
            bones.append(Bone(f"carpal{row_index}{k}", [Ellipsoid(r((x, y)), a, a * rng.uniform(0.75, 0.95), a, rng.uniform(0, math.pi))], cortex=0.18, trabecular_ends=False, shaft=None))
    soft.append(Ellipsoid(r((cx, wrist_y - 45 * px * size)), 46 * px * size, 40 * px * size, 16 * px * size))
    # Rays: thumb (2 phalanges) and four fingers (3 phalanges).
    base_y = carpal_y0 - 20 * px * size
    # The thumb is abducted about 30 degrees and curls back towards the fingers (its phalanges point more
    # upwards than its metacarpal), so it stays inside the field as on a real PA hand radiograph.
    spreads = (-0.55, -0.22, -0.05, 0.10, 0.26)
    mc_lengths = (42, 62, 60, 55, 50)
    ph_lengths = ((31, 24), (40, 24, 18), (45, 28, 19), (42, 27, 19), (33, 19, 17))
    widths = (8.5, 8.0, 8.0, 7.5, 7.0)
    for ray in range(5):
        angle = -math.pi / 2 + spreads[ray] + rng.normal(0, 0.04)
        start_x = cx + (ray - 2) * 14 * px * size + (-6 * px if ray == 0 else 0.0)
        start_y = base_y + (14 * px if ray == 0 else 0.0)
        p = (start_x, start_y)
        segments = [mc_lengths[ray]] + list(ph_lengths[ray])
        previous = None
        finger_shapes: list[Capsule] = []
        for j, length in enumerate(segments):
            length_px = length * px * size * rng.uniform(0.96, 1.04)
            q = (p[0] + length_px * math.cos(angle), p[1] + length_px * math.sin(angle))
            w = widths[ray] * px * size * (1.0 - 0.14 * j)
            name = f"ray{ray}_{j}"
            bone = Bone(name, [Capsule(r(p), r(q), w * 0.62, w * 0.55), Ellipsoid(r(q), w * 0.62, w * 0.6, w * 0.55)], cortex=0.30)
            bones.append(bone)
            finger_shapes.append(Capsule(r(p), r(q), w * 1.45, w * 1.35))
            if previous is not None:
                joints.append((previous, name, r(p)))
            previous = name
            gap = (2.2 - 0.2 * j) * px * size * gap_scale + 0.6 * px
            p = (q[0] + (gap + w * 0.62) * math.cos(angle), q[1] + (gap + w * 0.62) * math.sin(angle))
            angle += rng.normal(0, 0.03) + (0.16 if ray == 0 else 0.0)
        # Fingers: soft tissue from the proximal phalanx on (the palm covers the metacarpals); the thumb's
        # metacarpal lies in the thenar eminence, so its soft tissue starts at the metacarpal.
        first = finger_shapes[0] if ray == 0 else finger_shapes[1]
        soft.append(Capsule(first.p0, finger_shapes[-1].p1, first.r0, finger_shapes[-1].r1 * 0.9))
    return _Anatomy(bones, soft, joints, "HAND")


def _knee(rng: np.random.Generator, rows: int, columns: int, mm: float, grade: int) -> tuple[_Anatomy, tuple[float, float], float]:
    """AP knee: distal femur with two condyles, tibial plateau, fibular head, faint patella.

    Returns the anatomy, the medial compartment's joint centre and the medial gap (pixels), for narrowing.
    """
    px = 1.0 / mm
    size = rng.uniform(0.9, 1.1)
    cx = columns * rng.uniform(0.45, 0.55)
    joint_y = rows * rng.uniform(0.45, 0.55)
    tilt = rng.uniform(-0.08, 0.08)
    shaft_r = 14 * px * size
    condyle_a, condyle_b = 19 * px * size, 15 * px * size
    plateau_a, plateau_b = 40 * px * size, 11 * px * size
    base_gap = rng.uniform(5.0, 7.0) * px
    # Medial compartment narrows with the grade; lateral much less (as in medial knee OA).
    medial_gap = base_gap * (1.0 - 0.22 * grade) + 0.3 * px
    lateral_gap = base_gap * (1.0 - 0.06 * grade)
    plateau_y = joint_y + plateau_b
    medial_x, lateral_x = cx - 19 * px * size, cx + 19 * px * size  # medial on image left for a right knee

    def r(p: tuple[float, float]) -> tuple[float, float]:
        return _rot(p, (cx, joint_y), tilt)

    def plateau_top(x: float) -> float:
        u = (x - cx) / plateau_a
        return plateau_y - plateau_b * math.sqrt(max(1.0 - u * u, 0.0))

    medial_cy = plateau_top(medial_x) - medial_gap - condyle_b
    lateral_cy = plateau_top(lateral_x) - lateral_gap - condyle_b
    femur = Bone(
        "femur",
        [
            Capsule(r((cx, -60.0)), r((cx, joint_y - 32 * px * size)), shaft_r, shaft_r * 1.9),
            Ellipsoid(r((medial_x, medial_cy)), condyle_a, condyle_b, 22 * px * size, tilt),
            Ellipsoid(r((lateral_x, lateral_cy)), condyle_a, condyle_b, 22 * px * size, tilt),
            Ellipsoid(r((cx, joint_y - 28 * px * size)), 36 * px * size, 16 * px * size, 20 * px * size, tilt),
        ],
        cortex=0.22,
    )
    tibia = Bone(
        "tibia",
        [
            Capsule(r((cx + 2 * px, rows + 60.0)), r((cx, plateau_y + 20 * px * size)), shaft_r * 0.95, shaft_r * 1.9),
            Ellipsoid(r((cx, plateau_y)), plateau_a, plateau_b, 24 * px * size, tilt),
        ],
        cortex=0.22,
    )
    fibula_x = cx + 36 * px * size
    fibula = Bone(
        "fibula",
        [
            Capsule(r((fibula_x + 4 * px, rows + 60.0)), r((fibula_x, plateau_y + 18 * px * size)), 5 * px * size, 6 * px * size),
            Ellipsoid(r((fibula_x, plateau_y + 16 * px * size)), 8 * px * size, 7 * px * size, 8 * px * size),
        ],
        cortex=0.25,
    )
    patella = Bone("patella", [Ellipsoid(r((cx + rng.normal(0, 2) * px, joint_y - 24 * px * size)), 20 * px * size, 23 * px * size, 9 * px * size)], cortex=0.15, trabecular_ends=False, shaft=None)
    soft = [Capsule(r((cx, -80.0)), r((cx, rows + 80.0)), 58 * px * size, 52 * px * size), Ellipsoid(r((cx, joint_y)), 62 * px * size, 70 * px * size, 55 * px * size)]
    anatomy = _Anatomy([femur, tibia, fibula, patella], soft, [("femur", "tibia", r((medial_x, plateau_top(medial_x) - medial_gap / 2)))], "KNEE")
    return anatomy, r((medial_x, plateau_top(medial_x) - medial_gap / 2)), medial_gap


def _long_bone(rng: np.random.Generator, rows: int, columns: int, mm: float) -> _Anatomy:
    """AP femur (one bone) or a two-bone leg / forearm, the shafts nearly filling the height."""
    px = 1.0 / mm
    variant = rng.choice(["FEMUR", "LEG", "FOREARM"])
    cx = columns * rng.uniform(0.42, 0.58)
    tilt = rng.uniform(-0.07, 0.07)
    # Shaft view: both bone ends lie outside the field, cut the same way in every image. Ends at random
    # heights inside the field were the brightest structure and unpredictable for the MAE (its error peaked
    # there rather than on lesions); a clipped shaft continues predictably to the border.
    top, bottom = -rows * rng.uniform(0.12, 0.16), rows * rng.uniform(1.12, 1.16)
    centre = (cx, rows / 2)

    def r(p: tuple[float, float]) -> tuple[float, float]:
        return _rot(p, centre, tilt)

    def long_bone(name: str, x: float, radius: float, end_scale: float) -> Bone:
        p0, p1 = r((x, top + radius * 1.5)), r((x, bottom - radius * 1.5))
        return Bone(
            name,
            [
                Capsule(p0, p1, radius, radius * 0.95),
                Ellipsoid(p0, radius * end_scale, radius * 1.4, radius * 1.2, tilt),
                Ellipsoid(p1, radius * end_scale * 0.95, radius * 1.3, radius * 1.2, tilt),
            ],
            cortex=rng.uniform(0.28, 0.36),
        )

    size = rng.uniform(0.9, 1.1)
    if variant == "FEMUR":
        bones = [long_bone("femur", cx, 15 * px * size, 2.0)]
        soft_r = 70 * px * size
    elif variant == "LEG":
        bones = [long_bone("tibia", cx - 8 * px, 13 * px * size, 2.2), long_bone("fibula", cx + 26 * px * size, 6 * px * size, 1.6)]
        soft_r = 52 * px * size
    else:
        bones = [long_bone("radius", cx - 12 * px * size, 8 * px * size, 1.9), long_bone("ulna", cx + 12 * px * size, 7 * px * size, 1.6)]
        soft_r = 36 * px * size
    soft: list[Shape] = [Capsule(r((cx, -60.0)), r((cx, rows + 60.0)), soft_r, soft_r * 0.85)]
    return _Anatomy(bones, soft, [], str(variant))


# ---------------------------------------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------------------------------------


def _sphere_chord(canvas: _Canvas, centre: tuple[float, float], radius: float) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    sphere = Ellipsoid(centre, radius, radius, radius)
    win = canvas.window(sphere.bbox(2))
    if win is None:
        return None
    chord, _ = sphere.chord(canvas.xx[win], canvas.yy[win])
    return chord * canvas.mm, win


def _pick_site(
    rng: np.random.Generator, bones: list[Bone], canvas: _Canvas, metaphyseal: bool = True
) -> tuple[Bone, tuple[float, float], float] | None:
    """A point inside a bone's shaft (and well inside the image): (bone, (x, y), local bone radius in px).

    Bones are drawn in proportion to their shaft's cross-section (radius squared), so lesions favour the
    large bones where they are common and visible (distal radius, femur, tibia) over the fibula or a
    phalanx. With ``metaphyseal`` the site lies in the outer 8-28 % of the shaft (the trabecular
    metaphysis, where giant-cell tumours, metastases and enchondromas sit); otherwise anywhere in 12-88 %.
    """
    candidates = [b for b in bones if b.shaft is not None]
    weights = np.array([_shaft(b).radius(0.5) ** 2 for b in candidates])
    weights /= weights.sum()
    for _ in range(100):
        bone = candidates[int(rng.choice(len(candidates), p=weights))]
        shaft = _shaft(bone)
        if metaphyseal:
            t = rng.uniform(0.08, 0.28)
            t = t if rng.random() < 0.5 else 1.0 - t
        else:
            t = rng.uniform(0.12, 0.88)
        x, y = shaft.point(t)
        rad = shaft.radius(t)
        ux, uy = shaft.direction
        off = rng.uniform(-0.25, 0.25) * rad
        x, y = x - uy * off, y + ux * off
        margin = rad + 8
        if margin <= x < canvas.columns - margin and margin <= y < canvas.rows - margin:
            return bone, (x, y), rad
    return None


def _shaft(bone: Bone) -> Capsule:
    shaft = bone.shapes[bone.shaft or 0]
    assert isinstance(shaft, Capsule)
    return shaft


def _fracture(rng: np.random.Generator, bones: list[Bone], canvas: _Canvas) -> tuple[Bone, Capsule, tuple[float, float], tuple[float, float], float, tuple[float, float]] | None:
    """Choose a shaft, a point on it, a line direction, a gap width and a displacement."""
    candidates = [b for b in bones if b.shaft is not None]
    for _ in range(60):
        bone = candidates[int(rng.integers(len(candidates)))]
        shaft = bone.shapes[bone.shaft]
        assert isinstance(shaft, Capsule)
        t = rng.uniform(0.2, 0.8)
        x, y = shaft.point(t)
        if not (20 <= x < canvas.columns - 20 and 20 <= y < canvas.rows - 20):
            continue
        ux, uy = shaft.direction
        theta = rng.uniform(-0.7, 0.7)  # transverse to oblique
        nx, ny = -uy, ux  # across the shaft
        lx, ly = nx * math.cos(theta) - ny * math.sin(theta), nx * math.sin(theta) + ny * math.cos(theta)
        width = rng.uniform(1.5, 3.0) / canvas.mm
        disp_mm = rng.uniform(0.0, 3.0)
        disp = (-uy * disp_mm / canvas.mm * rng.choice([-1, 1]), ux * disp_mm / canvas.mm * rng.choice([-1, 1]))
        return bone, shaft, (x, y), (lx, ly), width, disp
    return None


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------

_SIZES: dict[str, tuple[int, int, float]] = {
    # rows, columns, mm per pixel (the detector's imager pixel spacing at this matrix)
    "hand": (512, 416, 0.45),
    "knee": (512, 448, 0.40),
    "long_bone": (512, 320, 0.85),
}


# Smallest focal lesion radius per kind: about half a 16-px patch of the 224-px model input, in mm.
_MIN_LESION_RADIUS_MM = {"hand": 6.0, "knee": 7.0, "long_bone": 11.0}


def generate(
    kind: str = "knee",
    seed: int = 0,
    *,
    findings: Iterable[str] = (),
    narrowing_grade: int = 0,
    lesion_radius_mm: float | None = None,
    texture: float = 0.08,
    laterality: str | None = None,
) -> Phantom:
    """Generate one phantom radiograph, deterministic for (kind, seed, findings, grade, radius, texture).

    ``findings`` is any subset of ``fracture``, ``lytic``, ``sclerotic``; ``narrowing_grade`` (0-4) shapes the
    joint spaces (knee: the medial compartment, hand: every finger joint) and is returned as a ``narrowing``
    finding whose mask is the narrowed joint's neighbourhood.
    """
    if kind not in _SIZES:
        raise ValueError(f"unknown phantom kind {kind!r}; expected one of {KINDS}")
    wanted = list(dict.fromkeys(findings))
    for name in wanted:
        if name not in FINDINGS:
            raise ValueError(f"unknown finding {name!r}; expected some of {FINDINGS}")
    if not 0 <= narrowing_grade <= 4:
        raise ValueError("narrowing_grade must be 0..4")
    # Separate streams: the same seed gives the same anatomy and noise with or without findings, so a
    # lesion image and its normal twin differ only where the lesion is.
    rng = np.random.default_rng([seed, KINDS.index(kind), 0])
    finding_rng = np.random.default_rng([seed, KINDS.index(kind), 1])
    noise_rng = np.random.default_rng([seed, KINDS.index(kind), 2])
    rows, columns, mm = _SIZES[kind]
    canvas = _Canvas(rows, columns, mm)

    joint_info: tuple[tuple[float, float], float] | None = None
    if kind == "hand":
        anatomy = _hand(rng, rows, columns, mm, gap_scale=1.0 - 0.2 * narrowing_grade)
    elif kind == "knee":
        anatomy, centre, gap = _knee(rng, rows, columns, mm, narrowing_grade)
        joint_info = (centre, gap)
    else:
        anatomy = _long_bone(rng, rows, columns, mm)
    side = laterality or str(rng.choice(["L", "R"]))

    tex = _trabecular_texture(noise_rng, (rows, columns), texture)
    canvas.add_soft(anatomy.soft)
    result: list[Finding] = []

    # Focal findings are chosen before the bones are drawn, since a fracture changes how a bone is drawn.
    fracture = _fracture(finding_rng, anatomy.bones, canvas) if "fracture" in wanted else None
    for bone in anatomy.bones:
        if fracture is not None and bone is fracture[0]:
            _draw_fractured(canvas, bone, fracture, tex, result)
        else:
            canvas.add_bone(bone, tex)

    for name in ("lytic", "sclerotic"):
        if name not in wanted:
            continue
        site = _pick_site(finding_rng, anatomy.bones, canvas, metaphyseal=kind != "long_bone")
        if site is None:
            continue
        bone, centre, bone_radius_px = site
        # About as wide as the bone (expansile up to 1.3x), and at least about one 16-px patch of the model's
        # 224-px view: smaller lesions vanish inside a single masked patch (see docs/demo-model.md).
        radius_mm = lesion_radius_mm if lesion_radius_mm is not None else float(
            np.clip(bone_radius_px * mm * finding_rng.uniform(0.9, 1.3), _MIN_LESION_RADIUS_MM[kind], 20.0)
        )
        radius_px = radius_mm / mm
        if name == "lytic":
            mask = _draw_lytic(canvas, bone, centre, radius_px, finding_rng)
        else:
            mask = _draw_sclerotic(canvas, centre, radius_px, finding_rng)
        result.append(Finding(name, mask, bone=bone.name, size_mm=2 * radius_mm))

    if narrowing_grade > 0 or kind in ("knee", "hand"):
        mask = np.zeros((rows, columns), bool)
        if joint_info is not None:
            (jx, jy), gap = joint_info
            _draw_osteoarthritis(canvas, (jx, jy), gap, narrowing_grade, finding_rng)
            win = canvas.window((jx - 25 / mm, jy - 12 / mm, jx + 25 / mm, jy + 12 / mm))
            if win is not None:
                mask[win] = True
        else:
            for _, _, (jx, jy) in anatomy.joints:
                win = canvas.window((jx - 4 / mm, jy - 4 / mm, jx + 4 / mm, jy + 4 / mm))
                if win is not None:
                    mask[win] = True
        if narrowing_grade > 0:
            result.append(Finding("narrowing", mask, bone="joint", grade=narrowing_grade))

    pixels = _detector(canvas.attenuation(), noise_rng, mm)
    if side == "L":
        # Mirror so that lateral structures (fibula, thumb) sit on the anatomically expected side.
        pixels = pixels[:, ::-1].copy()
        for finding in result:
            finding.mask = finding.mask[:, ::-1].copy()
    return Phantom(
        pixels=pixels,
        kind=kind,
        seed=seed,
        body_part=anatomy.body_part,
        laterality=side,
        view="PA" if kind == "hand" else "AP",
        pixel_spacing=(mm, mm),
        findings=result,
    )


def _draw_fractured(canvas: _Canvas, bone: Bone, fracture: tuple, tex: np.ndarray, result: list[Finding]) -> None:
    """Draw a bone in two fragments either side of a fracture line, with a gap and a small displacement."""
    _, shaft, (fx, fy), (lx, ly), width, (ddx, ddy) = fracture
    ux, uy = shaft.direction
    # Signed distance along the shaft axis relative to the fracture line (line through (fx, fy) along (lx, ly)).
    nx, ny = -ly, lx
    if nx * ux + ny * uy < 0:
        nx, ny = -nx, -ny
    side = (canvas.xx - fx) * nx + (canvas.yy - fy) * ny  # > 0: distal fragment
    distal = Bone(bone.name, [s.shifted(ddx, ddy) for s in bone.shapes], bone.cortex, bone.trabecular_ends, bone.shaft)
    before = (canvas.cortex.copy(), canvas.medulla.copy(), canvas.bone_outer.copy())
    canvas.add_bone(bone, tex)
    prox = (canvas.cortex - before[0], canvas.medulla - before[1], canvas.bone_outer - before[2])
    canvas.cortex[:], canvas.medulla[:], canvas.bone_outer[:] = before
    canvas.add_bone(distal, tex)
    dist = (canvas.cortex - before[0], canvas.medulla - before[1], canvas.bone_outer - before[2])
    # A soft-edged gap: bone is mostly absent within width/2 of the line.
    gap = np.clip((np.abs(side) - width / 2) / 1.0 + 0.5, 0.0, 1.0)
    keep = 0.12 + 0.88 * gap
    choose = side > 0
    canvas.cortex[:] = before[0] + np.where(choose, dist[0], prox[0]) * keep
    canvas.medulla[:] = before[1] + np.where(choose, dist[1], prox[1]) * keep
    outer = np.where(choose, dist[2], prox[2])
    canvas.bone_outer[:] = before[2] + outer
    mask = (np.abs(side) <= width / 2 + 2.0) & (outer > 0)
    mask = ndimage.binary_dilation(mask, iterations=2) & (outer > 0)
    result.append(Finding("fracture", mask, bone=bone.name, size_mm=float(width * canvas.mm)))


def _draw_lytic(canvas: _Canvas, bone: Bone, centre: tuple[float, float], radius: float, rng: np.random.Generator) -> np.ndarray:
    """Remove bone inside a sphere (geographic lysis), leaving a thin sclerotic rim; returns the mask."""
    paths = canvas.bone_paths(bone)
    sphere = _sphere_chord(canvas, centre, radius)
    mask = np.zeros((canvas.rows, canvas.columns), bool)
    if paths is None or sphere is None:
        return mask
    chord, win = sphere
    outer, inner, _, bwin = paths
    inside = np.zeros((canvas.rows, canvas.columns), np.float32)
    inside[win] = chord
    bone_outer = np.zeros_like(inside)
    bone_outer[bwin] = outer
    depth = rng.uniform(0.95, 1.0)  # full thickness: the lesion's core is soft-tissue dense
    # Fraction of the bone's path that the lesion replaces (marrow-like), capped to the bone itself.
    frac = depth * np.clip(2.5 * inside / np.maximum(bone_outer, 1e-3), 0.0, 1.0) * (bone_outer > 0)
    canvas.cortex *= 1.0 - frac
    canvas.medulla *= 1.0 - frac
    rim_sphere = Ellipsoid(centre, radius * 1.12, radius * 1.12, radius * 1.12)
    rwin = canvas.window(rim_sphere.bbox(2))
    if rwin is not None:
        rim_chord, _ = rim_sphere.chord(canvas.xx[rwin], canvas.yy[rwin])
        core_chord, _ = Ellipsoid(centre, radius, radius, radius).chord(canvas.xx[rwin], canvas.yy[rwin])
        shell = (rim_chord - core_chord) * canvas.mm
        canvas.cortex[rwin] += shell * 0.25 * (bone_outer[rwin] > 0)
    mask = (inside > 0) & (bone_outer > 0)
    return mask


def _draw_sclerotic(canvas: _Canvas, centre: tuple[float, float], radius: float, rng: np.random.Generator) -> np.ndarray:
    """Add dense, blotchy bone inside a sphere; returns the mask."""
    sphere = _sphere_chord(canvas, centre, radius)
    mask = np.zeros((canvas.rows, canvas.columns), bool)
    if sphere is None:
        return mask
    chord, win = sphere
    blotch = ndimage.gaussian_filter(rng.standard_normal(chord.shape).astype(np.float32), radius / 4)
    blotch = 1.0 + 0.5 * blotch / (blotch.std() + 1e-6)
    canvas.cortex[win] += chord * rng.uniform(0.45, 0.75) * np.clip(blotch, 0.3, 1.7)
    mask[win] = chord > 0
    return mask & (canvas.bone_outer > 0)


def _draw_osteoarthritis(canvas: _Canvas, centre: tuple[float, float], gap: float, grade: int, rng: np.random.Generator) -> None:
    """Osteophytes at the medial joint margin (grade >= 2) and subchondral sclerosis (grade >= 3)."""
    jx, jy = centre
    mm = canvas.mm
    if grade >= 2:
        size = (1.0 + 1.2 * (grade - 2)) / mm * rng.uniform(0.8, 1.2)
        for dy in (-gap / 2 - 2 / mm, gap / 2 + 2 / mm):
            spur = Ellipsoid((jx - 20 / mm, jy + dy), size * 1.6, size, size)
            win = canvas.window(spur.bbox(1))
            if win is not None:
                chord, _ = spur.chord(canvas.xx[win], canvas.yy[win])
                canvas.cortex[win] += chord * mm * 0.8
    if grade >= 3:
        band = Ellipsoid((jx, jy), 18 / mm, gap / 2 + 4 / mm, 10 / mm)
        win = canvas.window(band.bbox(1))
        if win is not None:
            chord, _ = band.chord(canvas.xx[win], canvas.yy[win])
            canvas.cortex[win] += chord * mm * 0.08 * (grade - 2) * (canvas.bone_outer[win] > 0)


def random_findings(rng: np.random.Generator, p_finding: float = 0.5) -> tuple[list[str], int]:
    """A random finding set for data sets: none with probability 1 - p_finding, else one focal finding."""
    findings: list[str] = []
    if rng.random() < p_finding:
        findings.append(str(rng.choice(list(FINDINGS))))
    grade = int(rng.choice(5, p=[0.35, 0.2, 0.2, 0.15, 0.1]))
    return findings, grade


# ---------------------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------------------

def _uid(*parts: object) -> str:
    """A deterministic UID: "2.25." + a 128-bit (UUID-sized) integer hashed from the parts."""
    import hashlib

    digest = hashlib.sha256("|".join(["msknode-phantom", *[str(p) for p in parts]]).encode()).hexdigest()
    return "2.25." + str(int(digest[:32], 16))


# SNOMED CT codes (CID 4031 anatomic regions, CID 4010 DX views).
_REGION_CODES = {
    "HAND": ("85562004", "Hand"),
    "KNEE": ("72696002", "Knee"),
    "FEMUR": ("71341001", "Femur"),
    "LEG": ("30021000", "Lower leg"),
    "FOREARM": ("14975008", "Forearm"),
}
_VIEW_CODES = {"AP": ("399348003", "antero-posterior"), "PA": ("399300004", "postero-anterior")}


def _code(value: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    return item


def to_dataset(
    phantom: Phantom,
    *,
    patient_index: int | None = None,
    study_key: str | None = None,
    instance_number: int = 1,
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    compress: str | None = None,
    study_date: _dt.date | None = None,
):
    """Build a CR or DX pydicom Dataset with plausible headers (synthetic patient, deterministic UIDs).

    ``compress`` may be ``"jpeg2000-lossless"`` (pydicom's encoder through pylibjpeg-openjpeg). With
    ``photometric="MONOCHROME1"`` the stored values are inverted (bone dark), as some CR readers store them.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        PYDICOM_IMPLEMENTATION_UID,
    )

    if modality not in ("CR", "DX"):
        raise ValueError("modality must be CR or DX")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    index = phantom.seed if patient_index is None else patient_index
    key = study_key or f"{phantom.kind}-{phantom.seed}"
    date = study_date or (_dt.date(2024, 1, 1) + _dt.timedelta(days=index % 700))
    sop_class = ComputedRadiographyImageStorage if modality == "CR" else DigitalXRayImageStorageForPresentation
    sop_uid = _uid("sop", key, instance_number, phantom.seed, phantom.kind, tuple(f.kind for f in phantom.findings))

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MSKNODE_PHANTOM"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "%02d%02d00" % (8 + index % 10, index % 60)
    ds.AccessionNumber = f"PH{index:08d}"[:16]
    ds.Modality = modality
    ds.Manufacturer = "msknode synthetic phantom"
    ds.InstitutionName = "Phantom Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"XR {phantom.body_part} {phantom.view}"
    ds.SeriesDescription = f"{phantom.body_part} {phantom.view}"
    ds.ManufacturerModelName = "msknode.engines.phantoms"
    ds.PatientName = f"PHANTOM^{phantom.body_part}^{index:04d}"
    ds.PatientID = f"PHANTOM{index:06d}"
    ds.PatientBirthDate = f"{1940 + index % 60:04d}0101"
    ds.PatientSex = "FM"[index % 2]
    ds.BodyPartExamined = phantom.body_part
    ds.StudyInstanceUID = _uid("study", key, index)
    ds.SeriesInstanceUID = _uid("series", key, index, phantom.body_part, modality)
    ds.StudyID = f"{index % 100000}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ["L", "F"] if phantom.laterality == "R" else ["R", "F"]
    ds.ViewPosition = phantom.view
    ds.BurnedInAnnotation = "NO"
    ds.ImagerPixelSpacing = [f"{phantom.pixel_spacing[0]:.4f}", f"{phantom.pixel_spacing[1]:.4f}"]
    ds.PixelSpacing = ds.ImagerPixelSpacing
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "synthetic phantom: spacing at the detector plane"
    if modality == "CR":
        ds.Laterality = phantom.laterality
    else:
        ds.ImageLaterality = phantom.laterality
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        # -1: higher values mean less X-ray intensity (bone bright, MONOCHROME2); stored inverted for MONOCHROME1.
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = []
        ds.ViewCodeSequence = [_code(*_VIEW_CODES[phantom.view])]
        ds.AnatomicRegionSequence = [_code(*_REGION_CODES[phantom.body_part])]
    if modality == "CR":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]

    pixels = phantom.pixels
    if photometric == "MONOCHROME1":
        pixels = (MAX_STORED - pixels.astype(np.int32)).astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    # The window spans every stored value: a viewer shows the whole image, and VOI windowing followed by the
    # model's min-max gives exactly the min-max of the raw values that the demo model was trained on.
    low, high = int(pixels.min()), int(pixels.max())
    ds.WindowCenter = f"{(low + high) / 2 + 0.5:.1f}"
    ds.WindowWidth = f"{max(high - low + 2, 2)}"
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"

    if compress == "jpeg2000-lossless":
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    elif compress not in (None, "", "none"):
        raise ValueError(f"unsupported compression {compress!r}")
    return ds


def write_dicom(phantom: Phantom, path: Path | str, **kwargs) -> Path:
    """Write ``phantom`` as a DICOM Part 10 file (see :func:`to_dataset` for the options)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = to_dataset(phantom, **kwargs)
    ds.save_as(path, enforce_file_format=True)
    return path


LABEL_COLUMNS = ("file", "kind", "body_part", "seed", "fracture", "lytic", "sclerotic", "lesion", "narrowing")


def write_dataset(
    out_dir: Path | str,
    count: int,
    *,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    p_finding: float = 0.5,
    modality: str = "CR",
    compress: str | None = None,
    monochrome1_every: int = 0,
    progress: bool = False,
) -> Path:
    """Write ``count`` phantom DICOM files plus ``labels.csv`` (one row per file) and return the CSV path.

    Each file is its own study of a synthetic patient. ``monochrome1_every=n`` stores every n-th image as
    MONOCHROME1 so that readers' inversion handling is exercised.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7919])
    rows: list[dict[str, object]] = []
    iterator: Iterable[int] = range(count)
    if progress:
        from rich.progress import track

        iterator = track(iterator, description="Writing phantoms", total=count)
    for i in iterator:
        kind = str(kinds[i % len(kinds)])
        findings, grade = random_findings(rng, p_finding)
        image_seed = seed * 1_000_003 + i
        phantom = generate(kind, image_seed, findings=findings, narrowing_grade=grade if kind != "long_bone" else 0)
        photometric = "MONOCHROME1" if monochrome1_every and i % monochrome1_every == monochrome1_every - 1 else "MONOCHROME2"
        name = f"{i:05d}_{kind}.dcm"
        write_dicom(phantom, out / name, patient_index=seed * 100_000 + i, modality=modality, photometric=photometric, compress=compress)
        labels = phantom.labels
        rows.append({"file": name, "kind": kind, "body_part": phantom.body_part, "seed": image_seed, **labels})
    csv_path = out / "labels.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(LABEL_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return csv_path
