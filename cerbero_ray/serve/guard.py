"""The replica's first line: an ASGI middleware in front of the FastAPI app. It lives in its own
module, so the settings it reads are this module's, in the replica process (the deployment class
itself reaches the replica pickled by value, with copies of the globals it names)."""

from starlette.responses import JSONResponse

from cerbero_ray.serve.schemas import error_body

GUARD = {"key": None, "max_body_bytes": 1 << 20}  # this replica's settings, set when it starts
KEYED = ("/v1/", "/tokenize", "/detokenize")  # the routes behind the API key


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware, before FastAPI reads or parses anything: two ``Authorization`` headers are a
    400, ``/v1/*`` (and ``/tokenize``, ``/detokenize``) without the right key a 401, and a body over
    ``max_body_bytes`` a 413 (by its Content-Length, or while it streams in), so a bad or huge
    request costs the replica nothing."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        raw = scope.get("headers") or []
        headers = dict(raw)
        key, limit = GUARD["key"], GUARD["max_body_bytes"]
        if sum(1 for k, _ in raw if k.lower() == b"authorization") > 1:  # which one counts would be a guess
            body = error_body("more than one Authorization header; send one", code="duplicate_header")
            return await JSONResponse(body, status_code=400)(scope, receive, send)
        if key and scope["path"].startswith(KEYED):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if given != f"Bearer {key}":
                body = error_body("missing or wrong API key (Authorization: Bearer <key>)", code="invalid_api_key")
                return await JSONResponse(body, status_code=401)(scope, receive, send)
        too_big = JSONResponse(error_body(f"the body is over {limit} bytes", code="body_too_large"), status_code=413)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await too_big(scope, receive, send)
        seen, started, over = 0, False, False

        async def limited():
            nonlocal seen, over
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    over = True
                    raise _BodyTooLarge
            return msg

        async def tracked(msg):
            nonlocal started
            if over:  # the app's answer to a body it could not finish reading (FastAPI makes it a 400)
                return
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.inner(scope, limited, tracked)
        except _BodyTooLarge:
            pass
        if over and not started:  # a body with no Content-Length (chunked) that grew past the limit
            await too_big(scope, receive, send)


def configure_guard(key: str | None, max_body_bytes: int) -> None:
    """Called by the replica when it starts."""
    GUARD.update(key=key, max_body_bytes=max_body_bytes)
