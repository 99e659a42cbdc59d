"""Server wiring in front of Gradio's routes: the library's access rules applied to every request.

An ASGI middleware on Gradio's FastAPI app: foreign Host headers (DNS rebinding) and state-changing requests
from foreign Origins are refused; wrong passwords are throttled per client; and the files the upload route
hands out are recorded per client, so a handler can accept only files its caller uploaded.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import gradio as gr
from starlette.datastructures import Headers

from sdlora.access import HostPolicy, LoginThrottle
from sdlora.data.uploads import UploadLedger

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CLIENT_COOKIE = "sdlora-client"  # names a browser's uploads; set on the page, sent back by same-site requests
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_LOGIN_FORM = 16 * 1024
MAX_UPLOAD_ANSWER = 4 * 1024**2  # the upload route's JSON list of paths; larger answers are not recorded


def client_owner(request: gr.Request | None) -> str:
    """Who a Gradio event comes from, as the guard recorded their uploads: the page's cookie, else the address."""
    if request is None:
        return "local"
    cookies = dict(getattr(request, "cookies", None) or {})
    if cookies.get(CLIENT_COOKIE):
        return f"cookie:{cookies[CLIENT_COOKIE]}"
    client = getattr(request, "client", None)
    return f"addr:{getattr(client, 'host', '') or ''}"


class ServerGuard:
    """The ASGI middleware; `policy` says which hosts and origins are answered."""

    def __init__(
        self, app: Callable, policy: HostPolicy, throttle: LoginThrottle, ledger: UploadLedger
    ) -> None:
        self.app, self.policy, self.throttle, self.ledger = app, policy, throttle, ledger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host, origin = headers.get("host"), headers.get("origin")
        method = scope.get("method", "GET")
        client = (scope.get("client") or ("", 0))[0]
        if not self.policy.allows_host(host):
            log.warning("Refused a request from %s for the foreign host %r.", client, (host or "")[:100])
            await _refuse(
                scope, send, 403, "Host not allowed: open the app at the address it was started on."
            )
            return
        if (scope["type"] == "websocket" or method not in SAFE_METHODS) and not self.policy.allows_origin(
            origin, host
        ):
            log.warning("Refused a %s from %s sent by the page %r.", method, client, (origin or "")[:100])
            await _refuse(scope, send, 403, "Cross-site request refused.")
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "").rstrip("/")
        cookie = _cookie(headers, CLIENT_COOKIE)
        if method == "POST" and path.endswith("/login"):
            await self._login(scope, receive, send, client)
        elif method == "POST" and path.endswith("/gradio_api/upload"):
            owner = f"cookie:{cookie}" if cookie else f"addr:{client}"
            await self._upload(scope, receive, send, owner)
        elif method == "GET" and path == "" and not cookie:
            await self.app(scope, receive, _with_cookie(send))
        else:
            await self.app(scope, receive, send)

    async def _login(self, scope: Scope, receive: Receive, send: Send, client: str) -> None:
        wait = self.throttle.wait_s(client)
        if wait > 0:
            await _refuse(
                scope,
                send,
                429,
                f"Too many wrong passwords: try again in {wait:.0f} s.",
                {"retry-after": f"{wait:.0f}"},
            )
            return
        body = bytearray()
        while True:  # the small login form, read first so the user name can be logged
            message = await receive()
            body.extend(message.get("body", b""))
            if len(body) > MAX_LOGIN_FORM:
                await _refuse(scope, send, 413, "Login form too large.")
                return
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        user = parse_qs(body.decode("latin-1")).get("username", [""])[0]
        status, replayed = 0, False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, replay, watch)
        if status == 200:
            self.throttle.succeeded(client)
        elif status in (400, 401):
            self.throttle.failed(client, user)

    async def _upload(self, scope: Scope, receive: Receive, send: Send, owner: str) -> None:
        """Pass the answer on unchanged, and record the paths it hands out as this client's."""
        status, body = 0, bytearray()

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and len(body) <= MAX_UPLOAD_ANSWER:
                body.extend(message.get("body", b""))
                if not message.get("more_body") and status == 200:
                    try:
                        paths = json.loads(bytes(body))
                    except ValueError:
                        paths = None
                    if isinstance(paths, list):
                        self.ledger.record(owner, [p for p in paths if isinstance(p, str)])
            await send(message)

        await self.app(scope, receive, record)


def _cookie(headers: Headers, name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name and value:
            return value
    return None


def _with_cookie(send: Send) -> Send:
    """Give a new browser its client cookie with the page (same-site only, invisible to scripts)."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            value = f"{CLIENT_COOKIE}={secrets.token_urlsafe(24)}; Path=/; HttpOnly; SameSite=Strict"
            message["headers"] = [*message.get("headers", []), (b"set-cookie", value.encode())]
        await send(message)

    return sending


async def _refuse(
    scope: Scope, send: Send, status: int, text: str, extra: dict[str, str] | None = None
) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = text.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    headers += [(key.encode(), value.encode()) for key, value in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
