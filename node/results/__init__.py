"""Result objects sent back to the PACS: TID 1500 Comprehensive 3D SR and error-map Secondary Captures.

Pure functions of typed inputs (:mod:`node.results.model`): no networking, no database, no torch, no clock.
Same inputs give byte-identical datasets with the same UIDs (:mod:`node.results.uids`).
"""

from node.results.model import DocumentReference, HeadOutput, ImageResult, ModelInfo, StudyResult
from node.results.sc import build_sc
from node.results.sr import build_not_analysed_sr, build_sr

__all__ = [
    "DocumentReference",
    "HeadOutput",
    "ImageResult",
    "ModelInfo",
    "StudyResult",
    "build_not_analysed_sr",
    "build_sc",
    "build_sr",
]
