"""Local dashboard users and their sessions, kept in the shared database (tables ``users``, ``web_sessions``).

The session cookie holds a random token; only its SHA-256 is stored, so a copy of the database cannot be
used to log in. Each session has its own CSRF token, checked on every POST.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shlex
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select

from node.web.passwords import hash_password, verify_password
from storage.db import Database, as_utc, utcnow
from storage.models import User, WebSession

ROLES = ("admin", "viewer")
USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
# Verified against when the user does not exist, so an unknown name costs as much time as a wrong password.
_DUMMY_HASH = hash_password("not-a-real-password")


@dataclass(frozen=True)
class UserInfo:
    id: int
    username: str
    role: str
    disabled: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class SessionInfo:
    user: UserInfo
    csrf_token: str


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _info(user: User) -> UserInfo:
    return UserInfo(user.id, user.username, user.role, bool(user.disabled))


class Accounts:
    """Users (add, list, remove, change password, authenticate) and sessions (start, look up, end)."""

    def __init__(self, database: Database) -> None:
        self.db = database

    # -- users -------------------------------------------------------------------------------
    def add_user(self, username: str, password: str, role: str) -> UserInfo:
        if not USERNAME_PATTERN.match(username):
            raise ValueError("username: 1-64 letters, digits or _ . @ -")
        if role not in ROLES:
            raise ValueError(f"role: must be one of {', '.join(ROLES)}")
        password_hash = hash_password(password)
        with self.db.session() as session:
            if session.scalar(select(User).where(User.username == username)) is not None:
                raise ValueError(f"username: {username!r} already exists")
            user = User(username=username, password_hash=password_hash, role=role, disabled=False, created_at=utcnow())
            session.add(user)
            session.flush()
            return _info(user)

    def users(self) -> list[tuple[UserInfo, str | None]]:
        """Every user with its last login time (ISO), by name."""
        with self.db.session() as session:
            return [
                (_info(u), as_utc(u.last_login_at).isoformat() if u.last_login_at else None)
                for u in session.scalars(select(User).order_by(User.username))
            ]

    def user_count(self) -> int:
        with self.db.session() as session:
            return int(session.scalar(select(func.count(User.id))) or 0)

    def remove_user(self, username: str) -> bool:
        with self.db.session() as session:
            user = session.scalar(select(User).where(User.username == username))
            if user is None:
                return False
            session.execute(delete(WebSession).where(WebSession.user_id == user.id))
            session.delete(user)
            return True

    def set_password(self, username: str, password: str) -> bool:
        """Change a password; the user's open sessions end."""
        password_hash = hash_password(password)
        with self.db.session() as session:
            user = session.scalar(select(User).where(User.username == username))
            if user is None:
                return False
            user.password_hash = password_hash
            session.execute(delete(WebSession).where(WebSession.user_id == user.id))
            return True

    def authenticate(self, username: str, password: str) -> UserInfo | None:
        with self.db.session() as session:
            user = session.scalar(select(User).where(User.username == username))
            stored = user.password_hash if user is not None else _DUMMY_HASH
            if not verify_password(password, stored) or user is None or user.disabled:
                return None
            user.last_login_at = utcnow()
            return _info(user)

    # -- sessions ----------------------------------------------------------------------------
    def start_session(self, user: UserInfo, hours: float) -> tuple[str, str]:
        """A new session; returns (cookie token, CSRF token). Expired sessions are purged on the way."""
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = utcnow()
        with self.db.session() as session:
            session.execute(delete(WebSession).where(WebSession.expires_at < now))
            session.add(
                WebSession(token_hash=token_hash(token), user_id=user.id, csrf_token=csrf, created_at=now,
                           expires_at=now + timedelta(hours=hours))
            )
        return token, csrf

    def session_for(self, token: str | None) -> SessionInfo | None:
        """The live session behind a cookie token, or None (unknown, expired, or user disabled/removed)."""
        if not token:
            return None
        with self.db.session() as session:
            row = session.execute(
                select(WebSession, User).join(User, User.id == WebSession.user_id)
                .where(WebSession.token_hash == token_hash(token))
            ).first()
            if row is None:
                return None
            web_session, user = row
            if as_utc(web_session.expires_at) <= utcnow() or user.disabled:
                return None
            return SessionInfo(_info(user), web_session.csrf_token)

    def end_session(self, token: str | None) -> None:
        if token:
            with self.db.session() as session:
                session.execute(delete(WebSession).where(WebSession.token_hash == token_hash(token)))


def first_user_hint(database: Database, config_path: str | os.PathLike[str] | None) -> str | None:
    """The log line that tells the admin how to create the first user (there is no default account)."""
    if Accounts(database).user_count() > 0:
        return None
    config = f" --config {shlex.quote(str(config_path))}" if config_path else ""
    return f"no dashboard user exists yet; create the first administrator with: msknode users add NAME --role admin{config}"
