"""The request plumbing every dashboard handler shares: the role's context, one authenticated request, and
:func:`page`, which looks up the session, enforces the role and, for a POST, checks the form's CSRF token
against the session's (403 otherwise) before the handler runs in a worker thread (handlers do blocking
database and file work).
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from node.settings import Settings
from node.web.accounts import Accounts, SessionInfo, UserInfo
from node.web.data import DashboardData
from node.web.login_throttle import LoginThrottle
from storage.db import Database
from storage.spool import Spool

log = logging.getLogger("msknode.web")

SESSION_COOKIE = "msknode_session"
LOGIN_COOKIE = "msknode_login"
FLASH_COOKIE = "msknode_flash"


@dataclass
class WebContext:
    """What the role's handlers share: settings, database, spool, accounts and the templates."""

    settings: Settings
    database: Database
    spool: Spool
    accounts: Accounts
    templates: Jinja2Templates
    secret: bytes
    data: DashboardData
    login_throttle: LoginThrottle

    @property
    def thumbnail_cache(self) -> Path:
        return self.spool.root / ".cache" / "thumbnails"


@dataclass
class PageRequest:
    """One authenticated request as a handler sees it."""

    request: Request
    web: WebContext
    session: SessionInfo
    form: dict[str, str] = field(default_factory=dict)
    flash: str | None = None

    @property
    def user(self) -> UserInfo:
        return self.session.user

    def render(self, template: str, status_code: int = 200, **context: Any) -> Response:
        context.update(user=self.user, csrf_token=self.session.csrf_token, flash=self.flash,
                       path=self.request.url.path)
        response = self.web.templates.TemplateResponse(self.request, template, context, status_code=status_code)
        if self.flash is not None:
            response.delete_cookie(FLASH_COOKIE)
        return response


def redirect(url: str, flash: str | None = None) -> RedirectResponse:
    """Post/redirect/get; an optional one-shot message rides in a short-lived cookie, never in the URL."""
    response = RedirectResponse(url, status_code=303)
    if flash:
        response.set_cookie(FLASH_COOKIE, quote(flash[:500]), max_age=60, httponly=True, samesite="lax")
    return response


def web_context(request: Request) -> WebContext:
    return request.app.state.web


def page(role: str = "viewer") -> Callable[[Callable[[PageRequest], Response]], Callable[[Request], Awaitable[Response]]]:
    """Wrap a blocking handler: session required (else to /login), ``role`` enforced, CSRF checked on POST."""

    def decorate(handler: Callable[[PageRequest], Response]) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            web = web_context(request)
            session = await run_in_threadpool(web.accounts.session_for, request.cookies.get(SESSION_COOKIE))
            if session is None:
                if request.method == "POST":
                    raise HTTPException(403, "not logged in")
                return RedirectResponse("/login", status_code=303)
            if role == "admin" and not session.user.is_admin:
                raise HTTPException(403, "this page needs the admin role")
            form: dict[str, str] = {}
            if request.method == "POST":
                raw = await request.form()
                form = {key: str(value) for key, value in raw.items()}
                if not hmac.compare_digest(form.get("csrf_token", ""), session.csrf_token):
                    log.warning("POST %s by %s without a valid CSRF token: refused", request.url.path, session.user.username)
                    raise HTTPException(403, "missing or invalid CSRF token")
            flash = request.cookies.get(FLASH_COOKIE)
            context = PageRequest(request, web, session, form, unquote(flash) if flash else None)
            return await run_in_threadpool(handler, context)

        return endpoint

    return decorate
