"""In Ray Serve's HTTP proxy, before any replica is chosen. Two middlewares:

- :class:`ProxyGuard` (outermost): reads the whole request body before the request is routed, with
  a deadline (``serve.body_timeout_s``, 408) and a size limit (``serve.max_body_bytes``, 413), so a
  client that sends its headers and then trickles or stalls its body holds a socket, never one of
  the replicas' ``max_ongoing_requests`` slots. It also carries the drain on SIGTERM: once the
  server's control actor (:class:`ServeControl`) says so, a new request is answered 503 with
  ``Retry-After``; every request accepted before (running, or queued for a replica) finishes, or
  at the end of ``serve.shutdown_grace_s`` is answered 503 (a stream: an error event, then
  ``[DONE]``) — never dropped. The driver shuts Serve down once no proxy holds a request (a drain
  503 being written counts: stopped mid-answer, it would reach the client as a status line alone).
- :class:`JSONErrors`: the errors the proxy answers itself — overload (``serve.overload_status``
  503 or 429, with ``Retry-After``), a request timeout (408), a replica lost mid-request (500), no
  route (the app not yet or no longer deployed: 503) — get the same JSON error object as every
  error of the app (``{"error": {"message", "type", "param", "code"}}``) instead of plain text.

Ray Serve installs proxy middlewares from the function named by the environment variable
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, read by the proxy process when it starts; the
settings come from the proxy's environment too (:func:`proxy_env`). ``jobs/serve.py`` on an embedded
cluster sets them; for ``ray start`` (cluster.yaml) and ``serve run`` set them on every node.
What no middleware can reach: uvicorn answers malformed HTTP (a negative ``Content-Length``, both
``Content-Length`` and ``Transfer-Encoding``) with a plain-text 400 before any ASGI code runs, and
it does not bound the time to send the headers (a client stalled there holds a socket only).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from http import HTTPStatus
from typing import TYPE_CHECKING

from cerbero_ray.serve.schemas import error_body

if TYPE_CHECKING:  # the proxy process imports this module: no config package there
    from cerbero_ray.config.serve import ServeConfig

PROXY_CALLBACK = "cerbero_ray.serve.proxy.proxy_middlewares"
CONTROL = ("cerbero_serve_control", "cerbero")  # the control actor's name and namespace
ENV = {  # the proxy's settings, from its environment (serve config key -> variable, default)
    "body_timeout_s": ("CERBERO_SERVE_BODY_TIMEOUT_S", 10.0),
    "max_body_bytes": ("CERBERO_SERVE_MAX_BODY_BYTES", 1 << 20),
    "retry_after_s": ("CERBERO_SERVE_RETRY_AFTER_S", 1.0),
}
POLL_S = 0.25  # how often a proxy reads the drain state and reports the requests it holds
_KINDS = {
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "overloaded"),
    408: ("timeout", "timeout"),
}


def proxy_env(sc: ServeConfig) -> dict[str, str]:
    """The environment variables that carry a ``serve`` config's proxy settings."""
    return {var: str(getattr(sc, key)) for key, (var, _) in ENV.items()}


def _setting(key: str) -> float:
    var, default = ENV[key]
    return float(os.environ.get(var, default))


def json_error(status: int, text: str) -> bytes:
    """The JSON error body for a plain-text answer ``text`` with HTTP ``status``."""
    kind, code = _KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    message = text.strip() or HTTPStatus(status).phrase
    return json.dumps(error_body(message, kind, code=code)).encode()


async def send_json(send, status: int, body: dict, retry_after: float | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(retry_after))).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


SHUTTING_DOWN = "the server is shutting down; retry (another replica or after the restart)"


class _Drain:
    """This proxy's view of the drain (polled from the control actor) and the requests it holds."""

    def __init__(self):
        self.draining, self.deadline, self.held, self.task = False, None, set(), None

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        import ray

        me, actor = ray.get_runtime_context().get_actor_id() or str(os.getpid()), None
        while True:
            try:
                actor = actor or ray.get_actor(CONTROL[0], namespace=CONTROL[1])
                draining, deadline = await actor.report.remote(me, len(self.held), self.draining)
                if draining and not self.draining:
                    self.draining = True
                self.deadline = deadline
            except Exception:  # no control actor (serve run), or it is gone: keep the last state
                actor = None
                await asyncio.sleep(2.0)  # and look again now and then, not every poll
            if self.draining and self.deadline is not None and time.time() >= self.deadline:
                for abort in list(self.held):
                    abort()
            await asyncio.sleep(POLL_S)


DRAIN = _Drain()


class ProxyGuard:
    """Pure ASGI middleware: the body read whole, under a deadline and a size limit, before the
    request goes on; the drain on SIGTERM (see the module's docstring)."""

    def __init__(self, app):
        self.app = app
        self.timeout, self.limit = _setting("body_timeout_s"), int(_setting("max_body_bytes"))
        self.retry_after = _setting("retry_after_s")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        DRAIN.start()
        if DRAIN.draining:  # held while it is written: the server stops once no proxy holds a request

            def writing() -> None:  # its entry among the held (one per answer): nothing to abort
                pass

            DRAIN.held.add(writing)
            try:
                return await send_json(
                    send, 503, error_body(SHUTTING_DOWN, "server_error", code="shutting_down"), self.retry_after
                )
            finally:
                DRAIN.held.discard(writing)
        body = await self._body(scope, receive, send)
        if body is None:  # answered (408, 413) or the client went away
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then: the client's disconnect, when it comes

        await self._held(scope, replay, send)

    async def _body(self, scope, receive, send) -> bytes | None:
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await send_json(send, 413, error_body(f"the body is over {self.limit} bytes", code="body_too_large"))
            return None
        chunks, seen, deadline = [], 0, time.monotonic() + self.timeout
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await send_json(
                    send,
                    408,
                    error_body(f"the request body did not arrive within {self.timeout:g} s", "timeout", code="timeout"),
                )
                return None
            if msg["type"] == "http.disconnect":
                return None
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                await send_json(send, 413, error_body(f"the body is over {self.limit} bytes", code="body_too_large"))
                return None
            if not msg.get("more_body"):
                return b"".join(chunks)

    async def _held(self, scope, receive, send) -> None:
        """Run the request; at the drain's deadline, answer it 503 (a stream: an error event and
        ``[DONE]``) and cancel what is left of it."""
        state = {"started": False, "sse": False, "done": False}

        async def tracked(msg):
            if state["done"]:
                return
            if msg["type"] == "http.response.start":
                state["started"] = True
                ctype = dict(msg.get("headers") or []).get(b"content-type", b"")
                state["sse"] = ctype.startswith(b"text/event-stream")
            await send(msg)

        task = asyncio.ensure_future(self.app(scope, receive, tracked))
        aborted = asyncio.Event()
        abort = aborted.set
        DRAIN.held.add(abort)
        try:
            stop = asyncio.ensure_future(aborted.wait())
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if task.done():
                return task.result()
            state["done"] = True
            task.cancel()
            err = error_body(f"{SHUTTING_DOWN}: the grace period ran out", "server_error", code="shutting_down")
            if not state["started"]:
                await send_json(send, 503, err, self.retry_after)
            elif state["sse"]:
                events = f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
                await send({"type": "http.response.body", "body": events, "more_body": False})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            DRAIN.held.discard(abort)


class JSONErrors:
    """Pure ASGI middleware: an error answer (status >= 400) that is not JSON is buffered and sent
    again as the JSON error object, its other headers (``Retry-After``) kept. The proxy's own 404
    (no route: the app is not deployed, or no longer) becomes a 503 with ``Retry-After``."""

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
                status, extra = held["status"], []
                text = b"".join(chunks).decode("utf-8", "replace")
                if status == 404:  # no route: our app is mounted at "/", so it is not running
                    status, text = 503, "the app is not running (starting or stopping); retry"
                    extra = [(b"retry-after", str(max(1, round(_setting("retry_after_s")))).encode())]
                body = json_error(status, text)
                keep = [
                    (k, v)
                    for k, v in held.get("headers") or []
                    if k.lower() not in (b"content-type", b"content-length")
                ]
                headers = [
                    *keep,
                    *extra,
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send({**held, "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(msg)

        await self.app(scope, receive, rewrite)


def proxy_middlewares() -> list:
    """What ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names: the proxy's extra middlewares (the
    last one listed is the outermost)."""
    from starlette.middleware import Middleware

    return [Middleware(JSONErrors), Middleware(ProxyGuard)]


class ServeControl:
    """The drain's meeting point (a named Ray actor, created by ``run_serve``): the driver starts
    the drain with a deadline; each proxy reports the requests it holds and reads the state."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.deadline, self.proxies = None, {}

    def drain(self, grace_s: float) -> None:
        self.deadline = time.time() + grace_s

    def report(self, proxy: str, held: int, draining: bool) -> tuple[bool, float | None]:
        self.proxies[proxy] = (held, draining)
        return self.deadline is not None, self.deadline

    def held(self) -> tuple[int, int, bool]:
        """(requests held by the proxies, proxies reporting, whether every one has seen the drain)."""
        return (
            sum(h for h, _ in self.proxies.values()),
            len(self.proxies),
            all(d for _, d in self.proxies.values()),
        )
