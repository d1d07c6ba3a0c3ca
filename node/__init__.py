"""node: DICOM networking, pipeline roles, result builders, web and CLI."""

__version__ = "0.1.0"
