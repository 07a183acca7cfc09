"""How the server reaches Alertmanager: its Authorization header and TLS verification.

Secrets are read from files (a Kubernetes Secret mounted as a volume), never taken from
the command line, and no message here or in the notifier includes them: errors name the
file, not its content.
"""

from __future__ import annotations

import base64
import ssl
import urllib.parse
from pathlib import Path


class AlertmanagerAccessError(ValueError):
    """Alertmanager settings that cannot be used together, or a secret file that cannot."""


def _read_secret(path: str, what: str) -> str:
    try:
        # Secret files usually end with a newline that is not part of the secret.
        secret = Path(path).read_text().strip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise AlertmanagerAccessError(f"{path}: cannot read the Alertmanager {what}: "
                                      f"{reason}") from None
    if not secret:
        raise AlertmanagerAccessError(f"{path}: the Alertmanager {what} file is empty")
    if any(not character.isprintable() for character in secret):
        raise AlertmanagerAccessError(f"{path}: the Alertmanager {what} holds control "
                                      "characters")
    return secret


def authorization_headers(username: str | None, password_file: str | None,
                          bearer_token_file: str | None) -> dict[str, str]:
    """The Authorization header for basic auth or a bearer token; none when neither is set."""
    if bearer_token_file and (username or password_file):
        raise AlertmanagerAccessError("Alertmanager basic auth and bearer token exclude each "
                                      "other: set one")
    if bearer_token_file:
        token = _read_secret(bearer_token_file, "bearer token")
        if any(character.isspace() for character in token):
            raise AlertmanagerAccessError(f"{bearer_token_file}: the Alertmanager bearer "
                                          "token holds whitespace")
        return {"Authorization": f"Bearer {token}"}
    if bool(username) != bool(password_file):
        raise AlertmanagerAccessError("Alertmanager basic auth needs both a username and a "
                                      "password file")
    if username and password_file:
        if ":" in username or any(not character.isprintable() for character in username):
            raise AlertmanagerAccessError("the Alertmanager username may not hold ':' or "
                                          "control characters")
        password = _read_secret(password_file, "password")
        credentials = base64.b64encode(f"{username}:{password}".encode()).decode()
        return {"Authorization": f"Basic {credentials}"}
    return {}


def check_url(url: str) -> None:
    """An http(s) URL without credentials in it (they would show in every log line)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AlertmanagerAccessError("the Alertmanager URL must be http:// or https:// "
                                      "with a host")
    if parts.username is not None or parts.password is not None:
        raise AlertmanagerAccessError("the Alertmanager URL may not hold credentials; use "
                                      "the username and password file settings")


def ssl_context(url: str, ca_file: str | None) -> ssl.SSLContext | None:
    """The context an https Alertmanager is verified with: ``ca_file``'s CA, else the
    system's (None); a CA file for a plain-http URL is a mistake worth stopping on."""
    if ca_file is None:
        return None
    if urllib.parse.urlsplit(url).scheme != "https":
        raise AlertmanagerAccessError("an Alertmanager CA file needs an https:// URL")
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise AlertmanagerAccessError(f"{ca_file}: cannot load the Alertmanager CA: "
                                      f"{exc}") from None
