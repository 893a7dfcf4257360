"""In Ray Serve's HTTP proxy, before any replica: the errors the proxy answers itself — overload
(``serve.overload_status`` 503 or 429, with ``Retry-After``), a request timeout (408), a replica
lost mid-request (500) — get the same JSON error object as every error of the app
(``{"error": {"message", "type", "param", "code"}}``) instead of the proxy's plain text. Answers
that already are JSON, and every success, pass through untouched.

Ray Serve installs proxy middlewares from the function named by the environment variable
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, read by the proxy process when it starts. An
embedded cluster gets it from :func:`cerbero_ray.runtime.init_ray`; for ``ray start`` (cluster.yaml)
and ``serve run`` set it in the environment of every node: ``PROXY_CALLBACK`` below.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from cerbero_ray.serve.schemas import error_body

PROXY_CALLBACK = "cerbero_ray.serve.proxy.proxy_middlewares"
_KINDS = {
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "overloaded"),
    408: ("timeout", "timeout"),
}


def json_error(status: int, text: str) -> bytes:
    """The JSON error body for a plain-text answer ``text`` with HTTP ``status``."""
    kind, code = _KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    message = text.strip() or HTTPStatus(status).phrase
    return json.dumps(error_body(message, kind, code=code)).encode()


class JSONErrors:
    """Pure ASGI middleware: an error answer (status >= 400) that is not JSON is buffered and sent
    again as the JSON error object, its other headers (``Retry-After``) kept."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict | None = None
        chunks: list[bytes] = []

        async def rewrite(msg):
            nonlocal held
            if msg["type"] == "http.response.start":
                ctype = dict(msg.get("headers") or []).get(b"content-type", b"")
                if msg["status"] >= 400 and not ctype.startswith(b"application/json"):
                    held = msg
                    return
            elif held is not None and msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))
                if msg.get("more_body"):
                    return
                body = json_error(held["status"], b"".join(chunks).decode("utf-8", "replace"))
                keep = [
                    (k, v)
                    for k, v in held.get("headers") or []
                    if k.lower() not in (b"content-type", b"content-length")
                ]
                headers = [*keep, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({**held, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(msg)

        await self.app(scope, receive, rewrite)


def proxy_middlewares() -> list:
    """What ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names: the proxy's extra middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(JSONErrors)]
