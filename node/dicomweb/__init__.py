"""The DICOMweb edge: STOW-RS in (PS3.18 10.5), with the guarantees of C-STORE intake (node/intake.py).

Served by the ``dicomweb`` role (``[dicomweb]``, node/runtime/service.py). Results *out* by STOW-RS are a
destination of the sender (node/delivery/dicomweb.py), not this package.
"""
