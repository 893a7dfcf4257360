"""A fault proxy for the S3 tests: an HTTP proxy on loopback in front of the S3 server that, on
demand, answers ``503 SlowDown``, drops connections, stalls, or is gone. Jobs point
``AWS_ENDPOINT_URL`` at it instead of the server.

    proxy = FaultProxy(upstream_port).start()
    proxy.inject("slowdown", 5)      # the next 5 requests: 503 SlowDown, as S3 throttles
    proxy.inject("drop", 3, every=4) # 3 of the next 12: the connection closed without an answer
    proxy.inject("stall", 2, 4.0)    # the next 2 wait 4 s before going on
    proxy.down(True)                 # every request refused until down(False)
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter, deque

SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
)
SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


def _read_until(sock: socket.socket, buf: bytearray, marker: bytes) -> bool:
    while marker not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        buf += chunk
    return True


def _read_exact(sock: socket.socket, buf: bytearray, n: int) -> bool:
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        buf += chunk
    return True


def _message(sock: socket.socket, buf: bytearray, response: bool = False) -> bytes | None:
    """One HTTP message (headers and body, Content-Length or chunked) from ``sock``; ``buf`` keeps
    what was read past it."""
    if not _read_until(sock, buf, b"\r\n\r\n"):
        return None
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    del buf[:end]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            if not _read_until(sock, buf, b"\r\n"):
                return None
            i = buf.index(b"\r\n")
            size = int(bytes(buf[:i]).split(b";")[0], 16)
            if not _read_exact(sock, buf, i + 2 + size + 2):
                return None
            body += buf[: i + 2 + size + 2]
            del buf[: i + 2 + size + 2]
            if size == 0:
                if bytes(body[-4:]) != b"\r\n\r\n" and not _read_until(sock, buf, b"\r\n"):
                    return None
                return head + bytes(body)
    n = int(headers.get("content-length", "0"))
    status = lines[0].split(" ")[1] if response else ""
    to_close = response and "content-length" not in headers and status not in ("204", "304")
    if to_close:
        while True:  # the body runs to the connection's end
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        body, buf[:] = bytes(buf), b""
        return head + body
    if not _read_exact(sock, buf, n):
        return None
    body = bytes(buf[:n])
    del buf[:n]
    return head + body


class FaultProxy:
    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.faults: deque = deque()
        self.lock = threading.Lock()
        self.is_down = False
        self.seen = Counter()  # what was injected and happened
        self.requests = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def inject(self, kind: str, times: int = 1, seconds: float = 0.0, every: int = 1) -> None:
        """The next ``times`` faults of ``kind``, one every ``every`` requests (the others pass)."""
        with self.lock:
            for _ in range(times):
                self.faults.extend([(kind, seconds)] + [(None, 0.0)] * (every - 1))

    def down(self, gone: bool) -> None:
        self.is_down = gone

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        buf = bytearray()
        try:
            while True:
                if self.is_down:
                    self.seen["down"] += 1
                    return
                request = _message(client, buf)
                if request is None:
                    return
                self.requests += 1
                with self.lock:
                    kind, seconds = self.faults.popleft() if self.faults else (None, 0.0)
                if kind:
                    self.seen[kind] += 1
                if kind == "drop":
                    return
                if kind == "slowdown":
                    client.sendall(SLOWDOWN.replace(b"{n}", str(len(SLOWDOWN_BODY)).encode()) + SLOWDOWN_BODY)
                    return
                if kind == "stall":
                    time.sleep(seconds)
                with socket.create_connection(self.upstream, timeout=120) as up:
                    up.sendall(request)
                    head_request = request.startswith(b"HEAD ")
                    ubuf = bytearray()
                    if head_request:
                        _read_until(up, ubuf, b"\r\n\r\n")
                        response = bytes(ubuf[: ubuf.index(b"\r\n\r\n") + 4])
                    else:
                        response = _message(up, ubuf, response=True)
                if response is None:
                    return
                client.sendall(response)
        except OSError:
            pass
        finally:
            client.close()

    def stop(self) -> None:
        self.sock.close()
