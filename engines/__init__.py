"""engines: everything about the model, and nothing about networking or the database.

Public API (names fixed so that other roles and checks can rely on them):

- ``engines.load(path, device="cpu") -> Encoder`` detects the checkpoint format on disk.
- ``Encoder.embed(x)`` / ``Encoder.error_map(x, noise=None, seed=None, passes=10)``.
- ``engines.preprocess(dataset)`` turns a pydicom dataset into model input, one tensor per frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["load", "preprocess", "Encoder"]

if TYPE_CHECKING:  # pragma: no cover
    from engines.mae.encoder import Encoder
    from engines.mae.loaders import load
    from engines.imaging.preprocess import preprocess


def __getattr__(name: str) -> Any:
    # Lazy: importing engines must not import torch for callers that only need a submodule.
    if name == "load":
        from engines.mae.loaders import load

        return load
    if name == "Encoder":
        from engines.mae.encoder import Encoder

        return Encoder
    if name == "preprocess":
        from engines.imaging.preprocess import preprocess

        return preprocess
    raise AttributeError(f"module 'engines' has no attribute {name!r}")
