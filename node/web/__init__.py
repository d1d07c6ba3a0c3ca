"""The ``web`` role: the dashboard (radiologist and IT views), /healthz and /metrics.

Server-rendered Starlette + Jinja2 pages; it reads and writes the shared database (users, sessions, peers,
dead letters) and reads the spool (thumbnails). It never speaks DIMSE itself except through ``node.dicom.scu``
for the admin's C-ECHO button.
"""

from node.web.app import create_app

__all__ = ["create_app"]
