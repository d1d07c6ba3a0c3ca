"""Logging in and out of the dashboard: a login form whose token is bound (HMAC) to a nonce cookie, failed-login
throttling, and sessions started and ended through :class:`~node.web.accounts.Accounts`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import secrets
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from node.web.pages import LOGIN_COOKIE, SESSION_COOKIE, PageRequest, page, web_context

log = logging.getLogger("msknode.web")


def load_secret(path: Path) -> bytes:
    """The key that signs the login form's CSRF token; created (mode 0600) on first start."""
    path = Path(path)
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_hex(32).encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key + b"\n")
    return key


def _login_token(secret: bytes, nonce: str) -> str:
    return hmac.new(secret, f"login:{nonce}".encode(), hashlib.sha256).hexdigest()


async def login_form(request: Request, error: str | None = None, status_code: int = 200) -> Response:
    """The login page; its form carries a token bound (HMAC) to a nonce cookie, so a forged login fails."""
    web = web_context(request)
    nonce = secrets.token_urlsafe(16)
    no_users = await run_in_threadpool(web.accounts.user_count) == 0
    response = web.templates.TemplateResponse(
        request, "login.html",
        {"login_token": _login_token(web.secret, nonce), "error": error, "no_users": no_users, "user": None},
        status_code=status_code,
    )
    response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="lax", secure=web.settings.web.cookie_secure)
    return response


async def login(request: Request) -> Response:
    web = web_context(request)
    form = await request.form()
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or not hmac.compare_digest(str(form.get("login_token", "")), _login_token(web.secret, nonce)):
        raise HTTPException(403, "missing or invalid CSRF token")
    username = str(form.get("username", "")).strip()
    address = request.client.host if request.client else "unknown"
    wait = web.login_throttle.retry_after(username, address)
    if wait:
        log.warning("dashboard login refused: too many failed logins (retry in %d s)", wait)
        minutes = math.ceil(wait / 60)
        response = await login_form(
            request, f"Too many failed logins. Try again in {minutes} minute{'s' if minutes != 1 else ''}.",
            status_code=429)
        response.headers["Retry-After"] = str(wait)
        return response
    user = await run_in_threadpool(web.accounts.authenticate, username, str(form.get("password", "")))
    if user is None:
        web.login_throttle.failed(username, address)
        log.warning("failed dashboard login")
        return await login_form(request, "Wrong user name or password.", status_code=401)
    web.login_throttle.succeeded(username)
    token, _csrf = await run_in_threadpool(web.accounts.start_session, user, web.settings.web.session_hours)
    log.info("dashboard login: %s (%s)", user.username, user.role)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        SESSION_COOKIE, token, max_age=int(web.settings.web.session_hours * 3600), httponly=True, samesite="lax",
        secure=web.settings.web.cookie_secure, path="/",
    )
    response.delete_cookie(LOGIN_COOKIE)
    return response


@page("viewer")
def logout(page_request: PageRequest) -> Response:
    page_request.web.accounts.end_session(page_request.request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
