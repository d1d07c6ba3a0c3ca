"""Shared test helpers: a running ``msknode serve`` subprocess, DICOM test data, DCMTK and PostgreSQL wrappers."""
