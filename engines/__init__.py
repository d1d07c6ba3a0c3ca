"""engines: the model families (what runs the model), and nothing about networking or the database.

Public API (names fixed so that other roles and checks can rely on them):

- ``engines.load(path, device="cpu", backend=None, precision=None) -> ModelFamily`` detects the family and the
  checkpoint format on disk (``engines/loading.py``).
- ``ModelFamily`` (``engines/family.py``): ``embed``, ``predict``, ``error_map_result`` / ``error_map`` when
  ``supports_error_map``, ``describe``, ``preprocessing`` (the model's ``preprocessor_config.json``).
- ``engines.preprocess(dataset, preprocessing=model.preprocessing)`` turns a pydicom dataset into model input,
  one tensor per frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["load", "preprocess", "ModelFamily"]

if TYPE_CHECKING:  # pragma: no cover
    from engines.family import ModelFamily
    from engines.imaging.preprocess import preprocess
    from engines.loading import load


def __getattr__(name: str) -> Any:
    # Lazy, to keep torch out of callers that only need a light submodule (e.g. the CLI's start-up); not a cycle.
    if name == "load":
        from engines.loading import load

        return load
    if name == "ModelFamily":
        from engines.family import ModelFamily

        return ModelFamily
    if name == "preprocess":
        from engines.imaging.preprocess import preprocess

        return preprocess
    raise AttributeError(f"module 'engines' has no attribute {name!r}")
