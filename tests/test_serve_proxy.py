"""The proxy middleware: Ray Serve's own plain-text error answers become our JSON error object."""

import asyncio
import json

from cerbero_ray.serve.proxy import JSONErrors, proxy_middlewares


def answer(status, headers, *chunks):
    """An ASGI app answering ``status`` with ``chunks`` as its body, the way Ray's proxy does."""

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for i, c in enumerate(chunks):
            await send({"type": "http.response.body", "body": c, "more_body": i < len(chunks) - 1})

    return app


def through(app):
    sent = []

    async def send(msg):
        sent.append(msg)

    async def receive():
        return {"type": "http.request", "body": b""}

    asyncio.run(JSONErrors(app)({"type": "http", "path": "/v1/chat/completions"}, receive, send))
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body


def test_overload_text_becomes_the_json_error_object_with_retry_after_kept():
    text = b"Request dropped due to backpressure (num_queued_requests=4, max_queued_requests=4)."
    status, headers, body = through(
        answer(503, [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"2")], text[:20], text[20:])
    )
    err = json.loads(body)["error"]
    assert status == 503 and headers[b"retry-after"] == b"2" and headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body)
    assert err == {"message": text.decode(), "type": "server_error", "param": None, "code": "overloaded"}
    _, _, body = through(answer(429, [(b"content-type", b"text/plain")], b""))
    assert json.loads(body)["error"] == {
        "message": "Too Many Requests",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }


def test_json_answers_and_successes_pass_untouched():
    ours = json.dumps({"error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": None}})
    for status, ctype, body in ((400, b"application/json", ours.encode()), (200, b"text/event-stream", b"data: x\n\n")):
        got = through(answer(status, [(b"content-type", ctype)], body[:5], body[5:]))
        assert got == (status, {b"content-type": ctype}, body)


def test_ray_serve_accepts_the_callback():
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    assert validate_http_proxy_callback_return(proxy_middlewares())[0].cls is JSONErrors


def test_a_drain_answer_counts_as_held_until_it_is_written(monkeypatch):
    """Once the drain is on, a new request is answered 503; the driver stops Serve when no proxy
    holds a request, so each such answer is held while it is written (two at once: held while
    either is), and not after."""
    from cerbero_ray.serve import proxy

    monkeypatch.setattr(proxy.DRAIN, "draining", True)
    monkeypatch.setattr(proxy.DRAIN, "task", object())  # no poll of a control actor
    monkeypatch.setattr(proxy.DRAIN, "held", set())
    guard = proxy.ProxyGuard(lambda *a: None)  # never reached
    held, sent = [], []

    def sender(gate):
        async def send(msg):
            held.append(len(proxy.DRAIN.held))
            sent.append(msg)
            await gate.wait()  # a slow client: the body waits for the socket

        return send

    async def main():
        slow, quick = asyncio.Event(), asyncio.Event()
        quick.set()

        async def receive():
            return {"type": "http.request", "body": b""}

        first = asyncio.ensure_future(guard({"type": "http", "headers": []}, receive, sender(slow)))
        await asyncio.sleep(0.01)
        await guard({"type": "http", "headers": []}, receive, sender(quick))  # starts and ends meanwhile
        during = len(proxy.DRAIN.held)
        slow.set()
        await first
        return during

    assert asyncio.run(main()) == 1  # the first is still being written
    assert proxy.DRAIN.held == set() and held and min(held) >= 1
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [503, 503]
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert [json.loads(b)["error"]["code"] for b in bodies] == ["shutting_down"] * 2
