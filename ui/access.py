"""Who may do what on the server: chat users sign in to talk, administrators may also change what is served.

Administration (knowledge edits, saving a threshold, switching the model or adapter, tuning with query
files) is off unless the server has admin credentials (`--admin-auth`) or was started with `--admin` on a
localhost-only server. Credentials come from an option, a file or an environment variable; a file or the
environment keeps the password out of `ps`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rag_persona.errors import RagPersonaError

AUTH_ENV = "RAG_PERSONA_AUTH"
ADMIN_AUTH_ENV = "RAG_PERSONA_ADMIN_AUTH"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
ADMIN_OFF = "administration is off: start with --admin or --admin-auth"
NOT_ADMIN = "administration needs the admin sign-in (--admin-auth)"

Credentials = tuple[str, str]


@dataclass(frozen=True)
class Access:
    """Chat credentials (None: the page is open), admin credentials, and --admin (everyone administers)."""

    chat: Credentials | None = None
    admin: Credentials | None = None
    local_admin: bool = False

    def __post_init__(self) -> None:
        if self.chat and self.admin and self.chat[0] == self.admin[0]:
            raise RagPersonaError(
                f"--admin-auth: user {self.admin[0]!r} is also the --auth user; give the admin another name"
            )

    @property
    def admin_enabled(self) -> bool:
        """Whether anyone at all may administer this server."""
        return self.local_admin or self.admin is not None

    @property
    def signed_in(self) -> bool:
        """Whether the page asks for a sign-in."""
        return self.chat is not None or self.admin is not None

    def is_admin(self, username: str | None) -> bool:
        """Admin rights for a signed-in user (None: nobody signed in)."""
        if self.local_admin:
            return True
        return self.admin is not None and username is not None and username == self.admin[0]

    def refusal(self, username: str | None) -> str | None:
        """None when `username` may administer, otherwise the message the caller gets."""
        if self.is_admin(username):
            return None
        return NOT_ADMIN if self.admin_enabled else ADMIN_OFF

    def gradio_auth(self) -> list[Credentials] | None:
        """The page's sign-ins: chat users and admins (None: no sign-in)."""
        pairs = [c for c in (self.chat, self.admin) if c is not None]
        return pairs or None

    def api_auth(self) -> Credentials | None:
        """The API's credentials: the chat user's, or the admin's when only admins may sign in (never open then)."""
        return self.chat or self.admin


def parse_credentials(value: str, where: str) -> Credentials:
    """USER:PASS (the password may contain ':'); `where` names the option, file or variable in the error."""
    user, sep, password = value.strip().partition(":")
    if not sep or not user or not password:
        raise RagPersonaError(f"{where}: expected USER:PASS (both non-empty)")
    return user, password


def load_credentials(
    value: str | None,
    file: str | Path | None,
    *,
    option: str,
    env_name: str,
    env: Mapping[str, str] | None = None,
) -> Credentials | None:
    """Credentials from `--<option> USER:PASS`, `--<option>-file PATH` or the environment variable, in that order."""
    if value and file:
        raise RagPersonaError(f"{option} and {option}-file: give one of them")
    if value:
        return parse_credentials(value, option)
    if file:
        path = Path(file)
        where = f"{option}-file {path}"
        if not path.is_file():
            raise RagPersonaError(f"{where}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise RagPersonaError(f"{where}: cannot read it as UTF-8 text") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) != 1:  # never echo the file: it holds a password
            raise RagPersonaError(f"{where}: expected one line USER:PASS")
        return parse_credentials(lines[0], where)
    raw = (os.environ if env is None else env).get(env_name, "")
    if raw.strip():
        return parse_credentials(raw, env_name)
    return None


def access_from_options(
    *,
    auth: str | None = None,
    auth_file: str | Path | None = None,
    admin_auth: str | None = None,
    admin_auth_file: str | Path | None = None,
    admin: bool = False,
    host: str = "127.0.0.1",
    share: bool = False,
    env: Mapping[str, str] | None = None,
) -> Access:
    """The server's Access from `rag-persona serve`'s options and the environment; one error line when refused."""
    chat = load_credentials(auth, auth_file, option="--auth", env_name=AUTH_ENV, env=env)
    admin_creds = load_credentials(
        admin_auth, admin_auth_file, option="--admin-auth", env_name=ADMIN_AUTH_ENV, env=env
    )
    if admin and host not in LOCAL_HOSTS:
        raise RagPersonaError(
            f"--admin: only on a localhost-only server (--host {host} is reachable from elsewhere); "
            "use --admin-auth USER:PASS"
        )
    if admin and share:
        raise RagPersonaError(
            "--admin: not with --share true (the share link makes the server public); use --admin-auth"
        )
    access = Access(chat=chat, admin=admin_creds, local_admin=admin)
    if share and not access.signed_in:
        raise RagPersonaError(
            "--share true: a public link needs a sign-in; give --auth or --admin-auth "
            f"(or {AUTH_ENV} / {ADMIN_AUTH_ENV})"
        )
    return access
