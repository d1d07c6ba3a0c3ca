"""The Starlette application of the ``dicomweb`` role: the HTTP edge for DICOM (STOW-RS), separate from the
dashboard (node/web/). Routes only; the handler is :mod:`node.dicomweb.stow`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node.dicomweb.stow import StowService
from node.intake import Intake
from node.settings import DicomwebSettings, PeerSettings
from storage.intake import IntakeRepository


def create_app(settings: DicomwebSettings, peers: Callable[[], Sequence[PeerSettings]], intake: Intake,
               index: IntakeRepository) -> Starlette:
    """``POST <base_path>/studies`` and ``POST <base_path>/studies/{study}`` (STOW-RS); nothing else is served."""
    stow = StowService(settings, peers, intake, index)
    base = settings.base_path.rstrip("/")

    async def store(request: Request) -> Response:
        return await stow.store(request)

    async def not_allowed(request: Request) -> Response:
        return JSONResponse({"error": "only STOW-RS (POST) is served here"}, status_code=405, headers={"Allow": "POST"})

    routes = [
        Route(f"{base}/studies", store, methods=["POST"]),
        Route(f"{base}/studies/{{study}}", store, methods=["POST"]),
        Route(f"{base}/studies", not_allowed, methods=["GET", "PUT", "DELETE"]),
        Route(f"{base}/studies/{{study}}", not_allowed, methods=["GET", "PUT", "DELETE"]),
    ]
    return Starlette(routes=routes)
