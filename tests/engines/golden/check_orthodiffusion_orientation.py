"""Check the OrthoDiffusion input orientation against dcm2niix, the converter behind their NIfTI training data.

Their ``dataset.py`` reads NIfTI volumes (``[H, W, slices]``) and rotates PNG masks by ``np.rot90(k=3)`` to match
them; our input path starts from an assembled DICOM volume ``[slices, rows, cols]``
(``engines.imaging.volume.assemble_volume``) and applies ``np.rot90(k=3)`` per slice (``InputSpec.rot90_k``). This
script renders the knee phantom's sagittal, coronal and axial series, converts each with dcm2niix, and reports the
rotation and slice order under which our assembled volume equals dcm2niix's array. Not a test (dcm2niix and
nibabel are not project dependencies)::

    pip install --target /tmp/orthodiffusion_deps dcm2niix nibabel
    .venv/bin/python tests/engines/golden/check_orthodiffusion_orientation.py /tmp/orthodiffusion_deps

Result on 2026-12-02 (dcm2niix 1.0.20260724, phantom 64 x 64 x 20): every plane matches with k = 3 and the
assembled slice order (no reversal); dcm2niix's axis codes were PSR (sagittal), LSP (coronal), LAS (axial).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from engines.imaging.volume import assemble_volume
from engines.training.knee_mri_phantoms import default_protocol, generate_study


def main() -> None:
    deps = Path(sys.argv[1])
    sys.path.append(str(deps))
    import nibabel  # noqa: PLC0415 - only in the throw-away folder

    study = generate_study(seed=2, protocol=default_protocol(64, 20, localizer=False, t1=False), size=64, slices=20)
    work = Path(tempfile.mkdtemp())
    study.write(work / "dcm")
    for series in study.series:
        volume = assemble_volume(series.datasets).array
        out = work / "nii" / series.spec.name
        out.mkdir(parents=True)
        subprocess.run([str(deps / "dcm2niix" / "dcm2niix"), "-z", "n", "-o", str(out), "-f", "v",
                        str(work / "dcm" / series.spec.name)], check=True, capture_output=True)
        image = nibabel.load(str(out / "v.nii"))
        array = np.asarray(image.dataobj).astype(np.float32)
        matches = [
            f"k={k}, reverse_slices={reverse}"
            for k in range(4)
            for reverse in (False, True)
            if (c := np.stack([np.rot90(s, k=k) for s in (volume[::-1] if reverse else volume)], axis=2)).shape
            == array.shape and np.allclose(c, array)
        ]
        print(f"{series.spec.name}: axes {''.join(nibabel.aff2axcodes(image.affine))}, matches: {matches or 'none'}")


if __name__ == "__main__":
    main()
