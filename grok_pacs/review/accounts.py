"""The review page's accounts (table `reviewers`): user name, password hash, role.

Passwords are kept only as a scrypt hash (werkzeug.security, a salted standard KDF); checking a password
against an unknown user still runs the KDF once, so a failed login takes as long whatever the user name.
Roles: `reviewer` and `administrator` may review results; `viewer` may only read the worklist and the studies
(a trainee, an auditor). A name with any other role never reaches the review actions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sqlalchemy import Engine, select, update
from werkzeug.security import check_password_hash, generate_password_hash

from grok_pacs.store import db, schema

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 12
HASH_METHOD = "scrypt"  # werkzeug's default: scrypt with n=2**15, r=8, p=1 and a 16-byte salt
_DUMMY_HASH = generate_password_hash("grok-pacs: no such user", method=HASH_METHOD)


class Role(StrEnum):
    REVIEWER = "reviewer"
    ADMINISTRATOR = "administrator"
    VIEWER = "viewer"  #: may read the worklist and the studies, may not review


REVIEW_ROLES = frozenset({Role.REVIEWER, Role.ADMINISTRATOR})


class AccountError(ValueError):
    """An account that cannot be made as asked; the message says why (never the password)."""


@dataclass(frozen=True)
class Reviewer:
    username: str
    role: Role
    display_name: str = ""

    @property
    def name(self) -> str:
        """What the verified SR names as the Verifying Observer."""
        return self.display_name or self.username

    @property
    def may_review(self) -> bool:
        return self.role in REVIEW_ROLES


def check_username(username: str) -> str:
    if not USERNAME_RE.match(username):
        raise AccountError(f"user name {username!r}: 1-64 letters, digits, '.', '_', '@' or '-'")
    return username


class Accounts:
    """The `reviewers` table. `target` is a database URL, an SQLite file path or an engine to share."""

    def __init__(self, target: str | Path | Engine) -> None:
        self._owns_engine = not isinstance(target, Engine)
        self.engine = db.open_engine(target) if not isinstance(target, Engine) else target
        schema.open_schema(self.engine)

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    def set(self, username: str, password: str, role: Role, display_name: str = "") -> Reviewer:
        """Add the account, or give an existing one this password, role and name."""
        check_username(username)
        role = Role(role)
        if len(password) < MIN_PASSWORD:
            raise AccountError(f"the password must have at least {MIN_PASSWORD} characters")
        if len(display_name) > 64:
            raise AccountError("the display name is longer than 64 characters")
        table = db.reviewers
        values = {
            "password_hash": generate_password_hash(password, method=HASH_METHOD),
            "role": role.value,
            "display_name": display_name,
        }
        with db.transaction(self.engine) as conn:
            stamp = db.now(conn)
            new = db.insert(conn, table).values(username=username, created_at=stamp, updated_at=stamp, **values)
            conn.execute(
                new.on_conflict_do_update(index_elements=[table.c.username], set_={**values, "updated_at": stamp})
            )
        return Reviewer(username, role, display_name)

    def get(self, username: str) -> Reviewer | None:
        row = self._row(username)
        return None if row is None else Reviewer(row.username, Role(row.role), row.display_name)

    def authenticate(self, username: str, password: str) -> Reviewer | None:
        """The account when the password is right, else None (the same work either way)."""
        row = self._row(username) if USERNAME_RE.match(username) else None
        if not check_password_hash(row.password_hash if row is not None else _DUMMY_HASH, password) or row is None:
            return None
        return Reviewer(row.username, Role(row.role), row.display_name)

    def set_role(self, username: str, role: Role) -> None:
        table = db.reviewers
        with db.transaction(self.engine) as conn:
            done = conn.execute(
                update(table).where(table.c.username == username).values(role=Role(role).value, updated_at=db.now(conn))
            )
            if done.rowcount != 1:
                raise AccountError(f"no account {username!r}")

    def _row(self, username: str):
        with db.transaction(self.engine, write=False) as conn:
            return conn.execute(select(db.reviewers).where(db.reviewers.c.username == username)).first()
