"""Who may use the app's server: logins, throttling of wrong passwords, and which Host names it answers.

The app is a single-user local tool by default. These rules keep it that way against a web page in the
user's own browser (DNS rebinding, cross-site requests), and make `--listen` with a login reasonable on a
trusted network. They know nothing of HTTP frameworks; `ui` applies them to Gradio's server.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from sdlora.errors import SdloraError

log = logging.getLogger(__name__)

AUTH_ENV = "SDLORA_AUTH"  # USER:PASSWORD (or a hashed line, see `hash_password`); one per line for several
PBKDF2_ITERATIONS = 600_000  # OWASP's 2023 advice for PBKDF2-HMAC-SHA256
FREE_FAILURES = 5  # wrong passwords a client may send before it has to wait
MAX_DELAY_S = 300.0  # the wait doubles with each further failure, up to this
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_PBKDF2 = re.compile(r"^pbkdf2_sha256:(\d+):([0-9a-f]+):([0-9a-f]{64})$")
_SHA256 = re.compile(r"^sha256:([0-9a-f]+):([0-9a-f]{64})$")


class AccessError(SdloraError, ValueError):
    """Login settings that can't be used; the message says what to fix."""


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The stored form of a password, `pbkdf2_sha256:ITERATIONS:SALT:HASH`, for an auth file or SDLORA_AUTH."""
    salt = secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), iterations)
    return f"pbkdf2_sha256:{iterations}:{salt}:{digest.hex()}"


@dataclass
class Credentials:
    """User names and their stored passwords: plain, `sha256:SALT:HEX` or `pbkdf2_sha256:N:SALT:HEX`."""

    stored: dict[str, str]

    def verify(self, user: str, password: str) -> bool:
        """Whether `password` is the user's; an unknown user costs the same comparison as a known one."""
        known = user in self.stored
        expected = self.stored.get(user) or next(iter(self.stored.values()), "")
        return _matches(expected, password) and known

    def __len__(self) -> int:
        return len(self.stored)


def _matches(stored: str, password: str) -> bool:
    if match := _PBKDF2.match(stored):
        iterations, salt, expected = int(match.group(1)), match.group(2), match.group(3)
        digest = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), iterations).hex()
        return hmac.compare_digest(digest, expected)
    if match := _SHA256.match(stored):
        salt, expected = match.group(1), match.group(2)
        digest = hashlib.sha256(bytes.fromhex(salt) + password.encode()).hexdigest()
        return hmac.compare_digest(digest, expected)
    return hmac.compare_digest(stored.encode(), password.encode())


def parse_credentials(text: str, source: str) -> Credentials:
    """`USER:PASSWORD` lines (blank lines and `#` comments ignored); the password may be in a hashed form."""
    stored: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise AccessError(f"{source}, line {number}: expected USER:PASSWORD.")
        stored[user.strip()] = password
    if not stored:
        raise AccessError(f"{source} holds no USER:PASSWORD line.")
    return Credentials(stored)


def load_auth_file(path: str | os.PathLike) -> Credentials:
    """Logins from a file, with a warning if other users may read it (a plain password in it would be theirs)."""
    path = Path(path)
    try:
        if os.name == "posix" and path.stat().st_mode & 0o077:
            log.warning("%s can be read by other users: chmod 600 it.", path)
        return parse_credentials(path.read_text(encoding="utf-8"), str(path))
    except OSError as error:
        raise AccessError(f"Can't read the auth file {path}: {error.strerror}.") from error


def credentials_from_env(environ: Mapping[str, str] = os.environ) -> Credentials | None:
    """Logins from SDLORA_AUTH, or None when it is unset (the environment is not in the process list)."""
    text = environ.get(AUTH_ENV, "")
    return parse_credentials(text, AUTH_ENV) if text.strip() else None


@dataclass
class LoginThrottle:
    """Per-client failure counts: after FREE_FAILURES wrong passwords a client waits 1 s, then 2 s, 4 s...

    Answered at once with how long to wait (never by sleeping, which would tie the server up). Bounded:
    the least recently seen clients are forgotten first."""

    free_failures: int = FREE_FAILURES
    max_delay_s: float = MAX_DELAY_S
    capacity: int = 10_000
    _clients: OrderedDict[str, tuple[int, float]] = field(default_factory=OrderedDict)  # failures, next try
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_s(self, client: str) -> float:
        """Seconds before `client` may try another password (0: now)."""
        with self._lock:
            _, allowed_at = self._clients.get(client, (0, 0.0))
        return max(0.0, allowed_at - time.monotonic())

    def failed(self, client: str, user: str = "") -> float:
        """Count a wrong password; returns the wait before the next try."""
        with self._lock:
            failures = self._clients.pop(client, (0, 0.0))[0] + 1
            extra = failures - self.free_failures
            delay = 0.0 if extra <= 0 else min(self.max_delay_s, 2.0 ** (extra - 1))
            self._clients[client] = (failures, time.monotonic() + delay)
            while len(self._clients) > self.capacity:
                self._clients.popitem(last=False)
        log.warning("Failed login for user %r from %s (%d in a row).", user[:64], client, failures)
        return delay

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)


def host_name(value: str) -> str:
    """The lower-case name or address of a Host header or URL authority: '[::1]:7860' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def is_loopback(host: str) -> bool:
    name = host_name(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def exposure_warning(bind: str, has_auth: bool) -> str | None:
    """The warning for serving beyond this machine without a login, whatever address was asked for."""
    if has_auth or is_loopback(bind):
        return None
    shown = "all interfaces" if host_name(bind) in ("0.0.0.0", "::", "") else bind
    return (
        f"Warning: serving on {shown} without a login lets anyone who can reach this machine train, "
        f"generate and delete adapters. Add --auth-file FILE (or set {AUTH_ENV}), and put the server "
        "behind TLS if the network is not trusted."
    )


@dataclass(frozen=True)
class HostPolicy:
    """Which Host headers and Origins the server answers.

    A DNS-rebinding page reaches the server under its own name, so only names the user chose are answered:
    loopback names for a loopback server; for one bound to other addresses also IP literals (a page can't
    rebind a literal address) and this machine's name; plus every `extra` name (--allowed-host)."""

    bind: str
    extra: tuple[str, ...] = ()

    @property
    def names(self) -> frozenset[str]:
        names = {*LOOPBACK_NAMES, *(host_name(name) for name in self.extra)}
        if not is_loopback(self.bind):
            machine = socket.gethostname().lower()
            names |= {machine, machine.split(".")[0], f"{machine.split('.')[0]}.local"}
        return frozenset(names)

    def allows_host(self, header: str | None) -> bool:
        if not header:
            return False
        name = host_name(header)
        if name in self.names:
            return True
        return not is_loopback(self.bind) and _is_ip(name)

    def allows_origin(self, origin: str | None, host_header: str | None) -> bool:
        """A browser's Origin is allowed when it is the page the server itself served (same host and port),
        or a name given with --allowed-host (a TLS proxy in front); requests without one are not from a page."""
        if origin is None:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null" (sandboxed frames, files) and anything odd
        if host_header and parts.netloc.lower() == host_header.strip().lower():
            return True
        return host_name(parts.netloc) in {host_name(name) for name in self.extra}


def allowed_host_names(values: Iterable[str]) -> tuple[str, ...]:
    """--allowed-host values checked to be plain names or addresses."""
    names = []
    for value in values:
        name = host_name(value)
        if not name or not re.fullmatch(r"[a-z0-9.:_-]+", name):
            raise AccessError(f"--allowed-host {value!r} is not a host name or address.")
        names.append(name)
    return tuple(names)
