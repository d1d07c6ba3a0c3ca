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

from node.results.model import SC_BLOCK, ImageResult, ModelInfo, StudyResult


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


def report_series_uid(kind: str, study_uid: str, model: ModelInfo, series_number: int, description: str) -> str:
    """Series UID of a study's reports ('sr', 'sr-not-analysed') by one model: the same for every revision of the
    study while the series-level attributes (number, description with the priority) stay the same, so a newer SR
    joins the older one's series and a viewer that shows the highest InstanceNumber of a series shows the newest.
    """
    return derive_uid("report-series", kind, study_uid, model.identity, str(series_number), description)


def sr_instance_number(revision: int) -> int:
    """InstanceNumber of the SR of a study revision: newer revisions number higher."""
    return revision


def sc_instance_number(revision: int, position: int) -> int:
    """InstanceNumber of the ``position``-th (1-based) SC of a revision: revision * 10000 + position, so the maps
    of a newer result set always sort after an older set's and never interleave with them."""
    if not 1 <= position < SC_BLOCK:
        raise ValueError(f"SC position must be in 1..{SC_BLOCK - 1}")
    return revision * SC_BLOCK + position


def instance_uid(kind: str, series: str, digest: str) -> str:
    return derive_uid("instance", kind, series, digest)


def device_uid(model: ModelInfo) -> str:
    """Device Observer / Contributing Equipment Device UID: changes when the weights change (IHE AIR asks so)."""
    return derive_uid("device", model.name, model.version, model.encoder_sha256)


def tracking_uid(study_uid: str, sop_instance_uid: str, frame_index: int, what: str) -> str:
    """Tracking UID of one finding on one image, stable across reports so viewers can follow it."""
    return derive_uid("tracking", study_uid, sop_instance_uid, str(frame_index), what)


def sorted_images(images: Sequence[ImageResult]) -> list[ImageResult]:
    """Images in a canonical order, so the caller's list order cannot change the bytes (several models' results
    on one image: by the model's identity; None, the study's model, first)."""
    return sorted(images, key=lambda im: (str(im.source.SOPInstanceUID), im.frame_index,
                                          "" if im.model is None else im.model.identity))
