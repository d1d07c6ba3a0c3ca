"""Synthetic knee MRI phantoms: a labelled 3-D knee in patient coordinates, rendered as MR series.

Why: no knee MRI data can be downloaded here, yet series selection, volume assembly, a 3-D model and its
Segmentation output must be built and tested on believable studies. The knee is a set of analytic shapes
(ellipsoids, capsules, wedges) in patient coordinates (LPS, mm; a right knee, joint line at z = 0), so
every series samples the *same* anatomy on its own grid and its ground truth is exact on that grid: no
resampling between planes.

Structures (label value = position in :data:`STRUCTURES` + 1; 0 = everything else):

 1 femur, 2 tibia, 3 patella (bone: cortex and marrow), 4 cartilage (femoral, trochlear, tibial and
 patellar together), 5 medial_meniscus, 6 lateral_meniscus, 7 acl, 8 pcl, 9 mcl, 10 lcl, 11 effusion
 (joint fluid beyond the physiological; empty unless the ``effusion`` finding is planted).

Unlabelled tissue is still rendered: subcutaneous fat, muscle, Hoffa's fat pad, the patellar tendon.
Labels give each structure's anatomical extent; a torn ligament keeps its label and the tear is a finding.

Findings (flags, each with a mask on every series' grid): ``acl_tear``, ``pcl_tear`` (a fluid-bright gap
across the ligament's mid-substance), ``mm_tear``, ``lm_tear`` (a bright cleft through the posterior horn),
``mcl_tear``, ``lcl_tear`` (a bright, oedematous mid-portion), ``pd`` (OrthoDiffusion's unexpanded label,
rendered here as lateral patellar dislocation: the patella displaced laterally with a bone bruise of the
lateral femoral condyle) and ``effusion`` (distended suprapatellar pouch and recesses).

Contrasts: ``pd_fs`` (proton density, fat saturated), ``t2_fs`` and ``t1``: tissue signal tables below,
a slice profile (intensities averaged over the slice thickness), a smooth coil-sensitivity field and Rician
noise. Series are written as MR Image Storage (one file per slice), or as Enhanced MR Image Storage (one
multi-frame file with per-frame functional groups). :func:`default_protocol` gives the three planes plus a
3-plane localiser and a sagittal T1 that selection must not choose.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from scipy import ndimage

STRUCTURES: tuple[str, ...] = (
    "femur", "tibia", "patella", "cartilage", "medial_meniscus", "lateral_meniscus",
    "acl", "pcl", "mcl", "lcl", "effusion",
)
LABELS: dict[str, int] = {name: index + 1 for index, name in enumerate(STRUCTURES)}
FINDINGS: tuple[str, ...] = ("acl_tear", "pcl_tear", "mm_tear", "lm_tear", "mcl_tear", "lcl_tear", "pd", "effusion")

Plane = Literal["sagittal", "coronal", "axial"]
Contrast = Literal["pd_fs", "t2_fs", "t1"]

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

# Image Orientation (Patient) per plane: (row direction, column direction), as scanners write them.
ORIENTATIONS: dict[str, tuple[float, float, float, float, float, float]] = {
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),  # rows run anterior -> posterior, columns head -> foot
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),  # rows run right -> left, columns head -> foot
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),  # rows run right -> left, columns anterior -> posterior
}
# The field-of-view centre per plane (mm): the knee's middle, a little above the joint line.
FOV_CENTRE = np.array([0.0, -4.0, 10.0])

# Tissue classes the renderer knows (index into the signal tables).
AIR, FAT, MUSCLE, MARROW, CORTEX, CARTILAGE, MENISCUS, LIGAMENT, FLUID, TEAR, OEDEMA, TENDON = range(12)
# Relative signal per tissue (0..1000) for each contrast; fat saturation darkens fat and marrow.
SIGNAL: dict[str, tuple[float, ...]] = {
    #          air  fat  muscle marrow cortex cartilage meniscus ligament fluid tear oedema tendon
    "pd_fs": (0.0, 70.0, 260.0, 95.0, 15.0, 540.0, 40.0, 90.0, 1000.0, 880.0, 620.0, 35.0),
    "t2_fs": (0.0, 55.0, 200.0, 75.0, 12.0, 360.0, 30.0, 60.0, 1000.0, 920.0, 700.0, 25.0),
    "t1": (0.0, 900.0, 360.0, 850.0, 20.0, 430.0, 45.0, 90.0, 220.0, 260.0, 400.0, 40.0),
}


@dataclass(frozen=True)
class Acquisition:
    """Acquisition parameters written to the header (what selection rules read)."""

    repetition_time_ms: float
    echo_time_ms: float
    echo_train_length: int
    fat_saturated: bool
    gradient_echo: bool = False  # GR (localiser) rather than turbo spin echo


SEQUENCE: dict[str, Acquisition] = {
    "pd_fs": Acquisition(3200.0, 32.0, 8, True),
    "t2_fs": Acquisition(4200.0, 75.0, 12, True),
    "t1": Acquisition(550.0, 12.0, 3, False),
}
LOCALIZER_ACQUISITION = Acquisition(8.6, 4.0, 1, False, gradient_echo=True)
MAX_STORED = 4095  # 12 bits


# ---------------------------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------------------------


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: Sequence[float],
               radii: Sequence[float]) -> np.ndarray:
    return (((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((z - centre[2]) / radii[2]) ** 2 <= 1.0)


def _segment_parameter(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: Sequence[float],
                       b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(t in [0, 1] of the nearest point on segment a-b, distance to it)."""
    ab = np.subtract(b, a, dtype=np.float64)
    length2 = float(ab @ ab)
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / length2
    t = np.clip(t, 0.0, 1.0)
    dx, dy, dz = x - (a[0] + t * ab[0]), y - (a[1] + t * ab[1]), z - (a[2] + t * ab[2])
    return t, np.sqrt(dx * dx + dy * dy + dz * dz)


def _flat_band(x: np.ndarray, y: np.ndarray, z: np.ndarray, top: Sequence[float], bottom: Sequence[float],
               half_width: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """A band running down z from ``top`` to ``bottom`` with an elliptic (x, y) section; (inside, t along it)."""
    t = (top[2] - z) / (top[2] - bottom[2])
    cx = top[0] + t * (bottom[0] - top[0])
    cy = top[1] + t * (bottom[1] - top[1])
    inside = (t >= 0) & (t <= 1) & (((x - cx) / half_width[0]) ** 2 + ((y - cy) / half_width[1]) ** 2 <= 1.0)
    return inside, t


@dataclass(frozen=True)
class KneeModel:
    """One knee: anatomy sizes drawn from the seed, and the planted findings."""

    seed: int
    findings: tuple[str, ...] = ()
    scale: float = 1.0  # overall size
    effusion_scale: float = 1.0

    @classmethod
    def create(cls, seed: int, findings: Iterable[str] = ()) -> "KneeModel":
        chosen = tuple(sorted(set(findings)))
        unknown = [name for name in chosen if name not in FINDINGS]
        if unknown:
            raise ValueError(f"unknown finding(s) {unknown}; known: {', '.join(FINDINGS)}")
        rng = np.random.default_rng([seed, 1702])
        return cls(seed, chosen, scale=float(rng.uniform(0.92, 1.08)), effusion_scale=float(rng.uniform(0.85, 1.15)))

    def sample(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(labels uint8, tissue class uint8, finding masks) at ``points`` [..., 3] (patient mm).

        Only points inside the leg are evaluated (the rest is air), in chunks that stay in the CPU cache: a
        512 x 512 x 30 series is 7.9 M points.
        """
        shape = points.shape[:-1]
        flat = points.reshape(-1, 3)
        total = flat.shape[0]
        labels = np.zeros(total, dtype=np.uint8)
        tissue = np.full(total, AIR, dtype=np.uint8)
        findings = {name: np.zeros(total, dtype=bool) for name in self.findings}
        chunk = 1 << 17
        for start in range(0, total, chunk):
            part = flat[start:start + chunk] / self.scale
            inside = np.nonzero((part[:, 0] / 62) ** 2 + ((part[:, 1] - 2) / 58) ** 2 <= 1)[0]
            if inside.size == 0:
                continue
            x, y, z = (np.ascontiguousarray(part[inside, axis], dtype=np.float32) for axis in range(3))
            part_labels, part_tissue, part_findings = self._sample_flat(x, y, z)
            labels[start + inside] = part_labels
            tissue[start + inside] = part_tissue
            for name, mask in part_findings.items():
                findings[name][start + inside] = mask
        return (labels.reshape(shape), tissue.reshape(shape),
                {name: mask.reshape(shape) for name, mask in findings.items()})

    def _sample_flat(self, x: np.ndarray, y: np.ndarray,
                     z: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The anatomy at flat coordinate arrays already divided by ``scale``."""
        has = set(self.findings)
        n = x.shape[0]

        # bones
        notch = (np.abs(x) < 7) & (y > -8) & (z < 30)
        condyles = _ellipsoid(x, y, z, (20, 8, 24), (16, 30, 21)) | _ellipsoid(x, y, z, (-20, 8, 24), (15, 30, 21))
        metaphysis = _ellipsoid(x, y, z, (0, 5, 45), (38, 26, 30))
        shaft = (x ** 2 + (y - 5) ** 2 <= 14 ** 2) & (z >= 40)
        femur = (condyles | metaphysis | shaft) & ~notch
        plateau = ((x / 38) ** 2 + ((y - 5) / 27) ** 2 <= 1) & (z >= -28) & (z <= -4)
        s = np.clip((z + 50) / 22, 0, 1)
        flare = (((x / (15 + 23 * s)) ** 2 + ((y - 5 - 3 * (1 - s)) / (15 + 12 * s)) ** 2) <= 1) & (z < -28)
        spines = _ellipsoid(x, y, z, (5, 5, -4), (4, 8, 5)) | _ellipsoid(x, y, z, (-5, 5, -4), (4, 8, 5))
        tibia = plateau | flare | spines
        patella_x = -18.0 if "pd" in has else 0.0
        patella_centre = (patella_x, -44.0, 36.0)
        patella = _ellipsoid(x, y, z, patella_centre, (21, 9, 17))

        # cartilage
        femoral_cartilage = (_ellipsoid(x, y, z, (20, 8, 24), (18.5, 32.5, 23.5))
                             | _ellipsoid(x, y, z, (-20, 8, 24), (17.5, 32.5, 23.5))) & ~notch & (z < 30)
        trochlear = _ellipsoid(x, y, z, (0, 5, 45), (40.5, 28.5, 32.5)) & (y < -8) & (z > 18) & (z < 62)
        tibial_cartilage = ((x / 35) ** 2 + ((y - 5) / 24) ** 2 <= 1) & (z > -4) & (z <= -1.5) & (np.abs(x) > 8)
        patellar_cartilage = _ellipsoid(x, y, z, patella_centre, (23, 12, 19)) & (y > patella_centre[1] + 1)
        cartilage = (femoral_cartilage | trochlear | tibial_cartilage | patellar_cartilage) & ~femur & ~patella & ~tibia

        # menisci: C-shaped wedges at each compartment's rim, open toward the notch
        menisci = {}
        cleft = {}
        for name, side, r_out, opening in (("medial_meniscus", 1, 18.0, 0.70), ("lateral_meniscus", -1, 16.0, 0.87)):
            cx, cy = 20.0 * side, 6.0
            dx, dy = x - cx, y - cy
            r = np.sqrt(dx * dx + dy * dy)
            r_in = r_out - 8.0
            top = -1.5 + 7.0 * np.clip((r - r_in) / (r_out - r_in), 0, 1)
            toward_notch = (-side * dx) / np.maximum(r, 1e-6)
            wedge = (r >= r_in) & (r <= r_out) & (z >= -1.5) & (z <= top) & (toward_notch < opening)
            menisci[name] = wedge
            mid = (-1.5 + top) / 2
            cleft[name] = wedge & (dy > 0.35 * r) & (np.abs(z - mid) < 0.9) & (r < r_out - 1.5)

        # ligaments
        acl_t, acl_d = _segment_parameter(x, y, z, (-8, 14, 15), (3, -6, -3))
        acl = acl_d <= 4.5
        pcl_t, pcl_d = _segment_parameter(x, y, z, (8, 2, 16), (0, 27, -11))
        pcl = pcl_d <= 5.0
        mcl, mcl_t = _flat_band(x, y, z, (40, 6, 32), (40.5, 6, -38), (1.6, 8.0))
        mcl_wide, _ = _flat_band(x, y, z, (40, 6, 32), (40.5, 6, -38), (4.5, 11.0))
        lcl_t, lcl_d = _segment_parameter(x, y, z, (-37, 14, 27), (-39, 19, -33))
        lcl = lcl_d <= 2.6
        tendon_t, tendon_d = _segment_parameter(x, y, z, (patella_x * 0.5, -47, 19), (0, -24, -32))
        patellar_tendon = tendon_d <= 3.5

        # joint fluid (effusion only when planted)
        pouch = (_ellipsoid(x, y, z, (0, -26, 58), (30, 7, 22 * self.effusion_scale))
                 | _ellipsoid(x, y, z, (20, 31, 21), (11, 5, 14)) | _ellipsoid(x, y, z, (-20, 31, 21), (11, 5, 14))
                 | _ellipsoid(x, y, z, (39, -6, 24), (4, 17, 14)) | _ellipsoid(x, y, z, (-39, -6, 24), (4, 17, 14))
                 | _ellipsoid(x, y, z, (0, -32, 28), (24, 5, 10)))
        leg = (x / 62) ** 2 + ((y - 2) / 58) ** 2 <= 1
        muscle_core = (x / 54) ** 2 + ((y - 2) / 50) ** 2 <= 1
        hoffa = _ellipsoid(x, y, z, (0, -27, 8), (18, 10, 12))

        labels = np.zeros(n, dtype=np.uint8)
        tissue = np.full(n, AIR, dtype=np.uint8)
        tissue[leg] = FAT
        tissue[muscle_core] = MUSCLE
        tissue[hoffa & leg] = FAT
        effusion = np.zeros(n, dtype=bool)
        if "effusion" in has:
            effusion = pouch & leg
        # lowest priority first; each later assignment wins
        for mask, label, cls in (
            (effusion, "effusion", FLUID),
            (patellar_tendon, None, TENDON),
            (mcl, "mcl", LIGAMENT), (lcl, "lcl", LIGAMENT),
            (acl, "acl", LIGAMENT), (pcl, "pcl", LIGAMENT),
            (menisci["medial_meniscus"], "medial_meniscus", MENISCUS),
            (menisci["lateral_meniscus"], "lateral_meniscus", MENISCUS),
            (cartilage, "cartilage", CARTILAGE),
            (femur, "femur", MARROW), (tibia, "tibia", MARROW), (patella, "patella", MARROW),
        ):
            if label is not None:
                labels[mask] = LABELS[label]
            else:
                labels[mask] = 0
            tissue[mask] = cls

        findings: dict[str, np.ndarray] = {}
        not_bone = (labels != LABELS["femur"]) & (labels != LABELS["tibia"])
        if "acl_tear" in has:
            findings["acl_tear"] = (acl_d <= 6.0) & (acl_t > 0.4) & (acl_t < 0.62) & not_bone
            tissue[findings["acl_tear"]] = TEAR
        if "pcl_tear" in has:
            findings["pcl_tear"] = (pcl_d <= 6.5) & (pcl_t > 0.35) & (pcl_t < 0.55) & not_bone
            tissue[findings["pcl_tear"]] = TEAR
        for flag, name in (("mm_tear", "medial_meniscus"), ("lm_tear", "lateral_meniscus")):
            if flag in has:
                findings[flag] = cleft[name] & (labels == LABELS[name])
                tissue[findings[flag]] = TEAR
        if "mcl_tear" in has:
            findings["mcl_tear"] = mcl_wide & (mcl_t > 0.35) & (mcl_t < 0.55) & (tissue <= MUSCLE)
            findings["mcl_tear"] |= mcl & (mcl_t > 0.35) & (mcl_t < 0.55)
            tissue[findings["mcl_tear"]] = OEDEMA
            tissue[mcl & (mcl_t > 0.42) & (mcl_t < 0.48)] = TEAR
        if "lcl_tear" in has:
            findings["lcl_tear"] = (lcl_d <= 5.5) & (lcl_t > 0.35) & (lcl_t < 0.55) & (tissue <= MUSCLE) | (
                lcl & (lcl_t > 0.35) & (lcl_t < 0.55))
            tissue[findings["lcl_tear"]] = OEDEMA
            tissue[lcl & (lcl_t > 0.43) & (lcl_t < 0.5)] = TEAR
        if "pd" in has:
            bruise = _ellipsoid(x, y, z, (-30, -12, 20), (9, 9, 9)) & (labels == LABELS["femur"])
            tissue[bruise] = OEDEMA
            findings["pd"] = bruise | (labels == LABELS["patella"])
        if "effusion" in has:
            findings["effusion"] = labels == LABELS["effusion"]
        return labels, tissue, findings


# ---------------------------------------------------------------------------------------------------------
# Series
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesSpec:
    """One series of the protocol: plane, contrast, grid and header facts."""

    name: str
    plane: Plane
    contrast: Contrast
    rows: int = 512
    columns: int = 512
    slices: int = 30
    field_of_view_mm: float = 160.0
    slice_thickness_mm: float = 3.0
    spacing_between_slices_mm: float = 3.5
    series_number: int = 1
    description: str = ""
    enhanced: bool = False  # one Enhanced MR multi-frame instance instead of one MR instance per slice
    localizer: bool = False  # a 3-plane localiser: one slice per plane, Image Type LOCALIZER

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]:
        return (self.field_of_view_mm / self.rows, self.field_of_view_mm / self.columns)


def default_protocol(size: int = 512, slices: int = 30, *, enhanced: bool = False, localizer: bool = True,
                     t1: bool = True, field_of_view_mm: float = 160.0) -> list[SeriesSpec]:
    """Sagittal PD FS, coronal PD FS, axial T2 FS (the model's inputs), plus a localiser and a sagittal T1."""
    spacing = 105.0 / slices  # the stack covers ~105 mm whatever the slice count
    thickness = round(spacing * 0.86, 2)
    common = dict(rows=size, columns=size, slices=slices, field_of_view_mm=field_of_view_mm,
                  slice_thickness_mm=thickness, spacing_between_slices_mm=round(spacing, 3), enhanced=enhanced)
    protocol = []
    if localizer:
        protocol.append(SeriesSpec("localizer", "sagittal", "t1", rows=max(32, size // 4), columns=max(32, size // 4),
                                   slices=1, field_of_view_mm=240.0, slice_thickness_mm=8.0,
                                   spacing_between_slices_mm=8.0, series_number=1, description="3-PLANE LOC",
                                   localizer=True))
    protocol += [
        SeriesSpec("sag_pd_fs", "sagittal", "pd_fs", series_number=2, description="SAG PD FS TSE", **common),
        SeriesSpec("cor_pd_fs", "coronal", "pd_fs", series_number=3, description="COR PD FS TSE", **common),
        SeriesSpec("ax_t2_fs", "axial", "t2_fs", series_number=4, description="AX T2 FS TSE", **common),
    ]
    if t1:
        protocol.append(SeriesSpec("sag_t1", "sagittal", "t1", series_number=5, description="SAG T1 TSE", **common))
    return protocol


def series_affine(spec: SeriesSpec, plane: str | None = None) -> np.ndarray:
    """4x4 (slice, row, column) -> patient mm for a spec's grid (the convention of engines.imaging.volume)."""
    orientation = np.asarray(ORIENTATIONS[plane or spec.plane])
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    row_spacing, column_spacing = spec.pixel_spacing_mm
    slices = 1 if spec.localizer else spec.slices
    centre_offset = (row_direction * column_spacing * (spec.columns - 1) / 2
                     + column_direction * row_spacing * (spec.rows - 1) / 2
                     + normal * spec.spacing_between_slices_mm * (slices - 1) / 2)
    affine = np.eye(4)
    affine[:3, 0] = normal * spec.spacing_between_slices_mm
    affine[:3, 1] = column_direction * row_spacing
    affine[:3, 2] = row_direction * column_spacing
    affine[:3, 3] = FOV_CENTRE - centre_offset
    return affine


@dataclass
class PhantomSeries:
    """A rendered series: its datasets, and ground truth on its grid (slices ascending along the normal)."""

    spec: SeriesSpec
    series_instance_uid: str
    datasets: list[Dataset]
    affine: np.ndarray  # 4x4 (slice, row, column) -> patient; for a localiser, the first image's
    pixels: np.ndarray  # uint16 [slices, rows, columns]
    labels: np.ndarray  # uint8 [slices, rows, columns], values of LABELS
    findings: dict[str, np.ndarray] = field(default_factory=dict)  # bool masks, same shape


@dataclass
class KneeStudy:
    """A whole phantom study: every series, the knee it images and its study-level facts."""

    model: KneeModel
    study_instance_uid: str
    frame_of_reference_uid: str
    series: list[PhantomSeries]

    @property
    def findings(self) -> tuple[str, ...]:
        return self.model.findings

    def by_name(self, name: str) -> PhantomSeries:
        for series in self.series:
            if series.spec.name == name:
                return series
        raise KeyError(name)

    def write(self, out_dir: Path | str) -> list[Path]:
        """Write every instance as ``<series name>/<instance>.dcm``; returns the paths."""
        out = Path(out_dir)
        paths = []
        for series in self.series:
            folder = out / series.spec.name
            folder.mkdir(parents=True, exist_ok=True)
            for index, dataset in enumerate(series.datasets):
                path = folder / f"{index + 1:04d}.dcm"
                dataset.save_as(path, enforce_file_format=True)
                paths.append(path)
        return paths


def _uid(*parts: object) -> str:
    """A deterministic UID: "2.25." + 128 bits hashed from the parts (same study -> same UIDs)."""
    digest = hashlib.sha256("|".join(["msknode-knee-mri", *[str(p) for p in parts]]).encode()).hexdigest()
    return "2.25." + str(int(digest[:32], 16))


SampleCache = dict[tuple[object, ...], tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]


def _render(model: KneeModel, spec: SeriesSpec, affine: np.ndarray, slices: int, rng: np.random.Generator,
            profile_samples: int,
            cache: SampleCache | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(uint16 pixels, labels, finding masks) on the grid of ``affine`` with ``slices`` slices.

    The anatomy sampled on a grid does not depend on the contrast, so series on the same grid (sagittal PD FS
    and T1) share ``cache``.
    """
    cache = {} if cache is None else cache
    k, r, c = np.meshgrid(np.arange(slices), np.arange(spec.rows), np.arange(spec.columns), indexing="ij")
    centres = (np.stack([k, r, c], axis=-1).astype(np.float64) @ affine[:3, :3].T + affine[:3, 3]).astype(np.float32)
    del k, r, c
    normal = (affine[:3, 0] / np.linalg.norm(affine[:3, 0])).astype(np.float32)
    cortex_pixels = max(1, int(round(1.5 / spec.pixel_spacing_mm[0])))
    grid_key = (affine.round(6).tobytes(), slices, spec.rows, spec.columns, cortex_pixels)

    def sampled(offset: float) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        key = (*grid_key, round(float(offset), 6))
        if key not in cache:
            labels, tissue, findings = model.sample(centres + normal * np.float32(offset))
            bone = np.isin(labels, (LABELS["femur"], LABELS["tibia"], LABELS["patella"]))
            inner = ndimage.binary_erosion(bone, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool),
                                           iterations=cortex_pixels)
            tissue[bone & ~inner & (tissue == MARROW)] = CORTEX
            cache[key] = (labels, tissue, findings)
        return cache[key]

    labels, _, findings = sampled(0.0)
    offsets = [0.0]  # across the slice thickness, evenly inside it
    if profile_samples > 1:
        offsets = list(np.linspace(-0.5, 0.5, profile_samples + 2)[1:-1] * spec.slice_thickness_mm)
    table = np.asarray(SIGNAL[spec.contrast], dtype=np.float32)
    signal = np.zeros(labels.shape, dtype=np.float32)
    for offset in offsets:
        signal += table[sampled(offset)[1]]
    signal /= len(offsets)
    # smooth trabecular texture, coil sensitivity (brighter near the skin), Rician noise
    texture = ndimage.gaussian_filter(rng.standard_normal(signal.shape, dtype=np.float32), sigma=(0, 1.2, 1.2))
    signal *= 1.0 + 0.08 * texture * (signal > 0)
    radius = np.sqrt(centres[..., 0] ** 2 + (centres[..., 1] - 2) ** 2)
    signal *= 0.85 + 0.35 * np.clip(radius / 62.0, 0, 1) ** 2
    sigma = np.float32(18.0)
    real = signal + rng.standard_normal(signal.shape, dtype=np.float32) * sigma
    imaginary = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
    pixels = np.clip(np.sqrt(real * real + imaginary * imaginary) * 2.6, 0, MAX_STORED).astype(np.uint16)
    return pixels, labels, findings


def generate_study(seed: int = 0, findings: Iterable[str] = (), protocol: Sequence[SeriesSpec] | None = None,
                   *, size: int = 512, slices: int = 30, enhanced: bool = False, profile_samples: int = 3,
                   study_date: dt.date | None = None) -> KneeStudy:
    """Render a knee MRI study (deterministic in ``seed``); see :func:`default_protocol` for the series."""
    model = KneeModel.create(seed, findings)
    specs = list(protocol) if protocol is not None else default_protocol(size, slices, enhanced=enhanced)
    key = f"{seed}|{','.join(model.findings)}"
    study_uid = _uid("study", key)
    frame_of_reference = _uid("frame-of-reference", key)
    rng = np.random.default_rng([seed, 4242])
    cache: SampleCache = {}
    study = KneeStudy(model, study_uid, frame_of_reference, [])
    date = study_date or (dt.date(2025, 1, 1) + dt.timedelta(days=seed % 300))
    for spec in specs:
        series_uid = _uid("series", key, spec.name, spec.series_number)
        if spec.localizer:
            parts = [_render(model, spec, series_affine(spec, plane), 1, rng, 1) for plane in ORIENTATIONS]
            pixels = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
            affines = [series_affine(spec, plane) for plane in ORIENTATIONS]
            datasets = [_mr_dataset(spec, study, series_uid, affines[i], pixels[i], i, date) for i in range(len(parts))]
            study.series.append(PhantomSeries(spec, series_uid, datasets, affines[0], pixels, labels, {}))
            continue
        affine = series_affine(spec)
        pixels, labels, masks = _render(model, spec, affine, spec.slices, rng, profile_samples, cache)
        if spec.enhanced:
            datasets = [_enhanced_dataset(spec, study, series_uid, affine, pixels, date)]
        else:
            datasets = [_mr_dataset(spec, study, series_uid, series_affine_slice(affine, i), pixels[i], i, date)
                        for i in range(spec.slices)]
        study.series.append(PhantomSeries(spec, series_uid, datasets, affine, pixels, labels, masks))
    return study


def series_affine_slice(affine: np.ndarray, slice_index: int) -> np.ndarray:
    """The affine of one slice of a stack (its origin moved to that slice)."""
    moved = affine.copy()
    moved[:3, 3] = affine[:3, 3] + affine[:3, 0] * slice_index
    return moved


# ---------------------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------------------


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _ds_str(value: float) -> str:
    """A DS value of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def _common(ds: Dataset, spec: SeriesSpec, study: KneeStudy, series_uid: str, date: dt.date) -> None:
    """Patient, study, series, equipment and frame-of-reference attributes shared by both SOP classes."""
    seed = study.model.seed
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date.strftime("%Y%m%d")
    ds.StudyTime = "090000"
    ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = f"09{spec.series_number:02d}00"
    ds.AccessionNumber = f"MRK{seed:08d}"[:16]
    ds.Modality = "MR"
    ds.Manufacturer = "msknode synthetic phantom"
    ds.InstitutionName = "Phantom Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MR KNEE RIGHT"
    ds.SeriesDescription = spec.description or spec.name
    ds.ManufacturerModelName = "msknode.engines.training.knee_mri_phantoms"
    ds.PatientName = f"PHANTOM^KNEE^{seed:04d}"
    ds.PatientID = f"PHMRK{seed:06d}"
    ds.PatientBirthDate = f"{1950 + seed % 50:04d}0101"
    ds.PatientSex = "FM"[seed % 2]
    ds.BodyPartExamined = "KNEE"
    ds.Laterality = "R"
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{seed % 100000}"
    ds.SeriesNumber = spec.series_number
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""


def _acquisition(spec: SeriesSpec) -> Acquisition:
    return LOCALIZER_ACQUISITION if spec.localizer else SEQUENCE[spec.contrast]


def _mr_dataset(spec: SeriesSpec, study: KneeStudy, series_uid: str, affine: np.ndarray, pixels: np.ndarray,
                index: int, date: dt.date) -> Dataset:
    """One MR Image Storage instance (one slice) with Image Plane and MR Image module attributes."""
    acquisition = _acquisition(spec)
    sop_uid = _uid("sop", series_uid, index)
    ds = Dataset()
    ds.file_meta = _file_meta(MR_IMAGE_STORAGE, sop_uid)
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    _common(ds, spec, study, series_uid, date)
    ds.InstanceNumber = index + 1
    ds.AcquisitionNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if spec.localizer else "M", "NORM"]
    ds.ScanningSequence = "GR" if acquisition.gradient_echo else "SE"
    ds.SequenceVariant = "SP" if acquisition.gradient_echo else "SK"
    ds.ScanOptions = "FS" if acquisition.fat_saturated else ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = "*fl2d1" if acquisition.gradient_echo else "*tse2d1"
    ds.AngioFlag = "N"
    ds.RepetitionTime = _ds_str(acquisition.repetition_time_ms)
    ds.EchoTime = _ds_str(acquisition.echo_time_ms)
    ds.EchoTrainLength = acquisition.echo_train_length
    ds.EchoNumbers = 1
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.2"
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = "3"
    ds.ReceiveCoilName = "Knee 15ch"
    ds.FlipAngle = "20" if acquisition.gradient_echo else "150"
    ds.SliceThickness = _ds_str(spec.slice_thickness_mm)
    ds.SpacingBetweenSlices = _ds_str(spec.spacing_between_slices_mm)
    ds.PixelSpacing = [_ds_str(spec.pixel_spacing_mm[0]), _ds_str(spec.pixel_spacing_mm[1])]
    row_direction = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    column_direction = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    ds.ImageOrientationPatient = [_ds_str(v) for v in (*row_direction, *column_direction)]
    ds.ImagePositionPatient = [_ds_str(v) for v in affine[:3, 3]]
    normal = np.cross(row_direction, column_direction)
    ds.SliceLocation = _ds_str(float(np.dot(affine[:3, 3], normal)))
    _pixel_module(ds, pixels)
    return ds


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MSKNODE_MRPH"
    return meta


def _pixel_module(ds: Dataset, pixels: np.ndarray) -> None:
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    low, high = int(pixels.min()), int(pixels.max())
    ds.WindowCenter = _ds_str((low + high) / 2)
    ds.WindowWidth = _ds_str(max(high - low, 2))
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    ds["PixelData"].VR = "OW"


def _enhanced_dataset(spec: SeriesSpec, study: KneeStudy, series_uid: str, affine: np.ndarray, pixels: np.ndarray,
                      date: dt.date) -> Dataset:
    """One Enhanced MR Image Storage instance holding the whole stack, geometry in per-frame functional groups."""
    acquisition = _acquisition(spec)
    sop_uid = _uid("sop-enhanced", series_uid)
    ds = Dataset()
    ds.file_meta = _file_meta(ENHANCED_MR_IMAGE_STORAGE, sop_uid)
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    _common(ds, spec, study, series_uid, date)
    del ds.Laterality  # Enhanced MR: laterality per frame (Frame Anatomy)
    del ds.AcquisitionTime
    del ds.AcquisitionDate
    ds.AcquisitionDateTime = date.strftime("%Y%m%d") + f"09{spec.series_number:02d}00"
    ds.DeviceSerialNumber = "PHANTOM-0001"
    ds.SoftwareVersions = "msknode"
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = {"pd_fs": "PROTON_DENSITY", "t2_fs": "T2", "t1": "T1"}[spec.contrast]
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = "3"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ImageComments = "synthetic phantom"
    ds.BurnedInAnnotation = "NO"
    ds.AcquisitionContextSequence = DicomSequence([])
    # MR Pulse Sequence module (required for ORIGINAL images)
    ds.PulseSequenceName = "TSE"
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "SPIN"
    ds.MultipleSpinEcho = "YES"
    ds.MultiPlanarExcitation = "YES"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "FAT" if acquisition.fat_saturated else "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.NumberOfKSpaceTrajectories = 1
    ds.AcquisitionDuration = 180.0
    ds.PresentationLUTShape = "IDENTITY"
    ds.NumberOfFrames = spec.slices
    # dimensions: stack id + in-stack position
    dimension_uid = _uid("dimension", series_uid)
    organisation = Dataset()
    organisation.DimensionOrganizationUID = dimension_uid
    ds.DimensionOrganizationSequence = DicomSequence([organisation])
    ds.DimensionOrganizationType = "3D"
    index_items = []
    for pointer, group in ((0x00209056, 0x00209111), (0x00209057, 0x00209111)):
        item = Dataset()
        item.DimensionOrganizationUID = dimension_uid
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = group
        index_items.append(item)
    ds.DimensionIndexSequence = DicomSequence(index_items)

    row_direction = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    column_direction = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [_ds_str(spec.pixel_spacing_mm[0]), _ds_str(spec.pixel_spacing_mm[1])]
    measures.SliceThickness = _ds_str(spec.slice_thickness_mm)
    measures.SpacingBetweenSlices = _ds_str(spec.spacing_between_slices_mm)
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = [_ds_str(v) for v in (*row_direction, *column_direction)]
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = DicomSequence([_code("72696002", "SCT", "Knee")])
    anatomy.FrameLaterality = "R"
    shared.FrameAnatomySequence = DicomSequence([anatomy])
    transform = Dataset()
    transform.RescaleIntercept = "0"
    transform.RescaleSlope = "1"
    transform.RescaleType = "US"
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    voi = Dataset()
    low, high = int(pixels.min()), int(pixels.max())
    voi.WindowCenter = _ds_str((low + high) / 2)
    voi.WindowWidth = _ds_str(max(high - low, 2))
    shared.FrameVOILUTSequence = DicomSequence([voi])
    timing = Dataset()
    timing.RepetitionTime = acquisition.repetition_time_ms
    timing.FlipAngle = 150.0
    timing.EchoTrainLength = acquisition.echo_train_length
    timing.RFEchoTrainLength = acquisition.echo_train_length
    timing.GradientEchoTrainLength = 0
    sar = Dataset()
    sar.SpecificAbsorptionRateDefinition = "IEC_WHOLE_BODY"
    sar.SpecificAbsorptionRateValue = 0.4
    timing.SpecificAbsorptionRateSequence = DicomSequence([sar])
    timing.GradientOutputType = "DB_DT"
    timing.GradientOutput = 20.0
    modes = []
    for mode_type in ("STATIC FIELD", "RF", "GRADIENT"):
        mode = Dataset()
        mode.OperatingModeType = mode_type
        mode.OperatingMode = "IEC_NORMAL"
        modes.append(mode)
    timing.OperatingModeSequence = DicomSequence(modes)
    shared.MRTimingAndRelatedParametersSequence = DicomSequence([timing])
    fov = Dataset()
    fov.InPlanePhaseEncodingDirection = "ROW"
    fov.MRAcquisitionFrequencyEncodingSteps = spec.columns
    fov.MRAcquisitionPhaseEncodingStepsInPlane = spec.rows
    fov.PercentSampling = 100.0
    fov.PercentPhaseFieldOfView = 100.0
    shared.MRFOVGeometrySequence = DicomSequence([fov])
    echo = Dataset()
    echo.EffectiveEchoTime = acquisition.echo_time_ms
    shared.MREchoSequence = DicomSequence([echo])
    modifier = Dataset()
    modifier.InversionRecovery = "NO"
    modifier.FlowCompensation = "NONE"
    modifier.Spoiling = "NONE"
    modifier.T2Preparation = "NO"
    modifier.SpectrallySelectedExcitation = "NONE"
    modifier.SpatialPresaturation = "NONE"
    modifier.PartialFourier = "NO"
    modifier.ParallelAcquisition = "NO"
    shared.MRModifierSequence = DicomSequence([modifier])
    imaging = Dataset()
    imaging.MagnetizationTransfer = "NONE"
    imaging.BloodSignalNulling = "NO"
    imaging.Tagging = "NONE"
    imaging.TransmitterFrequency = 123.2
    imaging.PixelBandwidth = 200.0
    shared.MRImagingModifierSequence = DicomSequence([imaging])
    receive = Dataset()
    receive.ReceiveCoilName = "Knee 15ch"
    receive.ReceiveCoilManufacturerName = "msknode"
    receive.ReceiveCoilType = "MULTICOIL"
    receive.QuadratureReceiveCoil = "NO"
    element = Dataset()
    element.MultiCoilElementName = "K1"
    element.MultiCoilElementUsed = "YES"
    receive.MultiCoilDefinitionSequence = DicomSequence([element])
    shared.MRReceiveCoilSequence = DicomSequence([receive])
    transmit = Dataset()
    transmit.TransmitCoilName = "Body"
    transmit.TransmitCoilManufacturerName = "msknode"
    transmit.TransmitCoilType = "BODY"
    shared.MRTransmitCoilSequence = DicomSequence([transmit])
    averages = Dataset()
    averages.NumberOfAverages = 1.0
    shared.MRAveragesSequence = DicomSequence([averages])
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    frame_type.PixelPresentation = "MONOCHROME"
    frame_type.VolumetricProperties = "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "NONE"
    frame_type.ComplexImageComponent = "MAGNITUDE"
    frame_type.AcquisitionContrast = ds.AcquisitionContrast
    shared.MRImageFrameTypeSequence = DicomSequence([frame_type])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    per_frame = []
    for index in range(spec.slices):
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [_ds_str(v) for v in affine[:3, 3] + affine[:3, 0] * index]
        item.PlanePositionSequence = DicomSequence([position])
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = index + 1
        content.DimensionIndexValues = [1, index + 1]
        content.FrameAcquisitionDateTime = ds.AcquisitionDateTime
        content.FrameReferenceDateTime = ds.AcquisitionDateTime
        content.FrameAcquisitionDuration = 180000.0
        item.FrameContentSequence = DicomSequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.ContentDate = date.strftime("%Y%m%d")
    _pixel_module(ds, pixels)
    del ds.WindowCenter
    del ds.WindowWidth
    return ds


def ground_truth_summary(study: KneeStudy) -> dict[str, object]:
    """A JSON-ready description of the study's ground truth (for a data set's labels file)."""
    return {
        "seed": study.model.seed,
        "study_instance_uid": study.study_instance_uid,
        "findings": {name: name in study.findings for name in FINDINGS},
        "structures": dict(LABELS),
        "series": [
            {"name": s.spec.name, "series_instance_uid": s.series_instance_uid, "plane": s.spec.plane,
             "contrast": s.spec.contrast, "series_number": s.spec.series_number, "description": s.spec.description,
             "localizer": s.spec.localizer, "enhanced": s.spec.enhanced}
            for s in study.series
        ],
    }


def random_findings(rng: np.random.Generator, p_finding: float = 0.3) -> list[str]:
    """Each finding independently with probability ``p_finding`` (a multi-label data set)."""
    return [name for name in FINDINGS if rng.random() < p_finding]


def write_studies(out_dir: Path | str, count: int, *, seed: int = 0, size: int = 128, slices: int = 24,
                  p_finding: float = 0.3, enhanced: bool = False, profile_samples: int = 3) -> Path:
    """Write ``count`` studies: ``<study>/<series>/NNNN.dcm``, ``<study>/<series>.npz`` (``labels`` and one mask
    per planted finding, ``[slice, row, column]`` in ascending position along the normal, the order
    ``engines.imaging.volume.assemble_volume`` gives) and ``<study>/ground_truth.json``; returns ``index.json``
    (one row per study: folder, seed, findings)."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 3301])
    index = []
    for number in range(count):
        study_seed = seed * 1_000_003 + number
        study = generate_study(study_seed, random_findings(rng, p_finding), size=size, slices=slices,
                               enhanced=enhanced, profile_samples=profile_samples)
        folder = out / f"study_{number:05d}"
        study.write(folder)
        for series in study.series:
            np.savez_compressed(folder / f"{series.spec.name}.npz", labels=series.labels, affine=series.affine,
                                **{f"finding_{name}": mask for name, mask in series.findings.items()})
        (folder / "ground_truth.json").write_text(json.dumps(ground_truth_summary(study), indent=1))
        index.append({"folder": folder.name, "seed": study_seed, "findings": list(study.findings)})
    path = out / "index.json"
    path.write_text(json.dumps(index, indent=1))
    return path


__all__ = [
    "FINDINGS", "LABELS", "STRUCTURES", "KneeModel", "KneeStudy", "PhantomSeries", "SeriesSpec", "default_protocol",
    "generate_study", "ground_truth_summary", "random_findings", "series_affine", "write_studies",
]
