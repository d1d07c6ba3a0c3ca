"""Deterministic UIDs for result objects: the same study, inputs and model always give the same UIDs.

Rule (documented in docs/results.md):

* input set = the sorted ``(SOPInstanceUID, frame, stored-instance sha256)`` of the analysed frames
  (plus the not-analysed instances for the not-analysed SR);
* **series UIDs** (one SR series, one SC series) = f(kind, study UID, model identity, input set, series
  number, series description). A retry or restart therefore reuses the series; a re-processed study whose
  inputs changed (an image added, replaced or removed), a new model or a changed priority gets a new
  series, deterministically;
* **SOP Instance UIDs** = f(kind, series UID, digest of the object's content). Identical content gives the same
  UID (a retry rebuilds byte-identical objects); different content never reuses a UID (DICOM requires it).

All UIDs are ``2.25.<integer of a name-based UUID>`` (ISO/IEC 9834-8 form, UUID version 5 of the parts), so no
organisational root is needed and no two kinds can collide. Note: ``pydicom.uid.generate_uid(prefix=None,
entropy_srcs=...)`` looks like the same thing but ignores ``entropy_srcs`` when ``prefix`` is None and returns a
random UUID, so it cannot be used here.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from node.results.model import ImageResult, ModelInfo, StudyResult


_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:msknode:results/1")


def derive_uid(*parts: str) -> str:
    """A ``2.25`` UID that depends only on ``parts`` (order matters; parts are length-prefixed)."""
    name = "".join(f"{len(part)}:{part};" for part in parts)
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


def content_digest(payload: Any) -> str:
    """sha256 of a JSON-able description of an object's content (sorted keys; floats at full repr)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def input_key(image: ImageResult) -> str:
    return f"{image.source.SOPInstanceUID}#{image.frame_index}#{image.source_sha256}"


def input_set(keys: Iterable[str]) -> str:
    return "\n".join(sorted(set(keys)))


def analysed_input_set(study: StudyResult) -> str:
    return input_set(input_key(image) for image in study.images)


def not_analysed_input_set(study: StudyResult) -> str:
    return input_set(f"{source.SOPInstanceUID}#-#{reason}" for source, reason in study.not_analysed)


def series_uid(kind: str, study_uid: str, model: ModelInfo, inputs: str, series_number: int, description: str) -> str:
    """Series UID for ``kind`` ('sr', 'sr-not-analysed', 'sc') of one study analysed by one model on one input set.

    The series-level attributes we write (number, description with the priority) are part of the identity, so
    one series never mixes instances that disagree about them (e.g. after the triage thresholds changed).
    """
    return derive_uid("series", kind, study_uid, model.identity, inputs, str(series_number), description)


def instance_uid(kind: str, series: str, digest: str) -> str:
    return derive_uid("instance", kind, series, digest)


def device_uid(model: ModelInfo) -> str:
    """Device Observer / Contributing Equipment Device UID: changes when the weights change (IHE AIR asks so)."""
    return derive_uid("device", model.name, model.version, model.encoder_sha256)


def tracking_uid(study_uid: str, sop_instance_uid: str, frame_index: int, what: str) -> str:
    """Tracking UID of one finding on one image, stable across reports so viewers can follow it."""
    return derive_uid("tracking", study_uid, sop_instance_uid, str(frame_index), what)


def sorted_images(images: Sequence[ImageResult]) -> list[ImageResult]:
    """Images in a canonical order, so the caller's list order cannot change the bytes."""
    return sorted(images, key=lambda im: (str(im.source.SOPInstanceUID), im.frame_index))
