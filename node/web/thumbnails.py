"""PNG thumbnails of the secondary captures (error map over the image) the worker wrote into the spool.

Rendered on first request and cached under ``<spool>/.cache/thumbnails``; a thumbnail is named by the SC's
SOP Instance UID, so a new result revision gets its own file and stale ones are never shown.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

SECONDARY_CAPTURE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7",  # SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # multi-frame true colour SC
}
THUMBNAIL_SIZE = 384


@dataclass(frozen=True)
class ResultImage:
    sop_instance_uid: str
    source_sop_instance_uid: str | None
    path: Path


def result_images(spool_root: Path, study_instance_uid: str) -> list[ResultImage]:
    """The newest SC series of a study (the latest result revision), in instance order."""
    directory = Path(spool_root) / "results" / study_instance_uid
    if not directory.is_dir():
        return []
    series: dict[str, list[tuple[int, float, ResultImage]]] = {}
    for path in directory.glob("*/*.dcm"):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if str(header.get("SOPClassUID", "")) not in SECONDARY_CAPTURE_CLASSES:
            continue
        sources = header.get("SourceImageSequence") or []
        source = str(sources[0].ReferencedSOPInstanceUID) if sources else None
        entry = ResultImage(str(header.SOPInstanceUID), source, path)
        series.setdefault(str(header.SeriesInstanceUID), []).append(
            (int(header.get("InstanceNumber") or 0), path.stat().st_mtime, entry)
        )
    if not series:
        return []
    newest = max(series.values(), key=lambda entries: max(mtime for _, mtime, _ in entries))
    return [entry for _, _, entry in sorted(newest, key=lambda item: item[0])]


def _to_rgb(pixels: np.ndarray) -> Image.Image:
    if pixels.ndim == 2:
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) / (high - low) * 255 if high > low else np.zeros_like(pixels, dtype=float)
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


def prune_cache(cache_dir: Path, max_age_seconds: float) -> int:
    """Delete cached thumbnails not rendered for ``max_age_seconds`` (their studies are gone by retention)."""
    removed = 0
    cutoff = time.time() - max_age_seconds
    for path in Path(cache_dir).glob("*.png"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def thumbnail_png(image: ResultImage, cache_dir: Path, max_age_seconds: float | None = None) -> bytes:
    """The cached PNG, rendering (and atomically caching) it first if needed.

    Each new render also prunes thumbnails older than ``max_age_seconds`` (retention's age), so the cache
    never outgrows the studies it belongs to."""
    cached = Path(cache_dir) / f"{image.sop_instance_uid}.png"
    if cached.exists():
        return cached.read_bytes()
    dataset = pydicom.dcmread(image.path)
    pixels = dataset.pixel_array
    if getattr(dataset, "NumberOfFrames", 1) and int(getattr(dataset, "NumberOfFrames", 1)) > 1:
        pixels = pixels[0]
    picture = _to_rgb(pixels)
    picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    data = buffer.getvalue()
    cached.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    staged = cached.with_suffix(f".{os.getpid()}.part")
    staged.write_bytes(data)
    os.replace(staged, cached)
    if max_age_seconds is not None:
        prune_cache(cache_dir, max_age_seconds)
    return data
