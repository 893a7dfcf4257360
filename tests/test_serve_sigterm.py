"""``jobs/serve.py`` as systemd, Kubernetes and ``ray job stop`` end it, and as slow clients try it:
SIGTERM while requests are in flight and queued (every accepted request finishes, or past the
grace period is answered 503 in our JSON object — a stream gets an error event and ``[DONE]`` —
never dropped; a request that arrives while draining is a 503 with ``Retry-After`` until the port
closes), and uploads that stall (a 408, without holding a replica's slot)."""

import concurrent.futures as cf
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from cerbero_ray.config import REPO_DIR
from conftest import free_port

pytestmark = pytest.mark.integration


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, json.loads(r.read())


def _start(tiny_hf, tmp_path, *overrides, **popen):
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO_DIR, "jobs", "serve.py"),
            f"serve.checkpoint={tiny_hf}",
            f"serve.port={port}",
            "cluster.num_cpus=2",
            "serve.max_batch_size=4",
            "serve.shutdown_grace_s=60",
            *overrides,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the server did not come up")
        time.sleep(1)


@pytest.mark.slow  # a server of its own for one signal path (~25 s)
def test_sigterm_to_the_whole_process_group_exits_at_once_and_says_why(tiny_hf, tmp_path):
    """systemd's default KillMode, `timeout` and `kill -- -PGID` signal Ray's own processes too: no
    drain is possible then. The job says so and exits 143 in seconds, not after a minute's wait
    for a GCS that is gone."""
    proc, url = _start(tiny_hf, tmp_path, start_new_session=True)
    try:
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise AssertionError(f"still running 60 s after the signal:\n{out[-4000:]}") from None
        took = time.monotonic() - t0
        assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
        assert "KillMode=mixed" in out and "Failed to connect to GCS" not in out
        assert took < 30, took
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_ray_stopping_during_the_drain_ends_the_server_at_once(monkeypatch):
    """On a loaded machine Ray's own processes, signalled with the server, can outlive the first
    look at the GCS: a watcher ends the server as soon as the GCS goes, during the drain; not after
    the drain, when our own shutdown stops the embedded cluster's GCS."""
    from cerbero_ray.serve import service

    alive, exits = [True], []
    monkeypatch.setattr(service, "gcs_reachable", lambda wait_s=1.0: alive[0])
    monkeypatch.setattr(service.os, "_exit", exits.append)
    done = service._watch_gcs(signal.SIGTERM)
    time.sleep(1.2)
    assert exits == []  # the GCS is up: the drain goes on
    alive[0] = False
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        time.sleep(0.1)
    done.set()
    assert exits[:1] == [128 + signal.SIGTERM]
    exits.clear()
    alive[0] = True
    done = service._watch_gcs(signal.SIGTERM)
    done.set()  # the drain is over
    alive[0] = False
    time.sleep(1.2)
    assert exits == []


def _try(url, body, timeout=120):
    """(status, JSON body, headers), or the connection error's class name."""
    try:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}
        except http.client.IncompleteRead:  # the connection closed mid-answer: as the port closes
            return "IncompleteRead", None, {}
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        return type(reason).__name__, None, {}


def _stall(port: int, sent: bytes = b'{"messages": ') -> socket.socket:
    """A client that sends its headers and the start of its body, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += "Content-Length: 100\r\n\r\n"
    sock.sendall(head.encode() + sent)
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 20:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body[body.index(b"{") :])


LONG = {
    "messages": [{"role": "user", "content": "Raccontami una storia lunga."}],
    "max_tokens": 96,  # 16 running, 8 queued: ~3 s of decoding still to do here when the signal comes at 1 s
    "temperature": 0.8,
}
# heavy label work (the hostile pass's finding 7): an inline task of 16 long labels over 16 texts (near the cost limit)
HEAVY_LABEL = {
    "task": {
        "instruction": "Di quale argomento parla il testo?",
        "labels": {f"l{i}": f"{i} " + "argomento molto specifico " * 8 for i in range(16)},
    },
    "texts": [f"Testo numero {i}: " + "una frase qualunque sul tempo e sul mare. " * 6 for i in range(16)],
}


def test_stalled_uploads_hold_no_slot_and_sigterm_keeps_every_accepted_request(tiny_hf, tmp_path):
    proc, url = _start(
        tiny_hf,
        tmp_path,
        "serve.max_batch_size=16",
        "serve.max_ongoing_requests=16",
        "serve.max_new_tokens=512",
        "serve.body_timeout_s=4",
    )
    port = int(url.rsplit(":", 1)[1])
    try:
        # 1. twenty clients stall mid-body: more than the replica's 16 slots; a normal request goes through
        stalled = [_stall(port) for _ in range(20)]
        t0 = time.monotonic()
        status, out, _ = _try(f"{url}/v1/chat/completions", {**LONG, "max_tokens": 4}, timeout=60)
        assert status == 200 and time.monotonic() - t0 < 4, (status, out)
        answers = [_answer(s) for s in stalled]  # after body_timeout_s: a 408 each, our JSON object
        assert all(st == 408 and b["error"]["code"] == "timeout" for st, b in answers), answers[:2]
        for s in stalled:
            s.close()
        # 2. SIGTERM with 16 requests running, 8 queued and heavy label work (the scorer runs between
        # decode steps on the same model): all 24 and the label requests get an answer, none is dropped
        with cf.ThreadPoolExecutor(40) as pool:
            accepted = [pool.submit(_try, f"{url}/v1/chat/completions", LONG) for _ in range(24)]
            finished = []  # when each accepted request was answered
            for f in accepted:
                f.add_done_callback(lambda _: finished.append(time.monotonic()))
            labels = [pool.submit(_try, f"{url}/v1/label", HEAVY_LABEL, 180) for _ in range(3)]
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            # new requests every 0.1 s, each on its own thread (one accepted before the proxies learnt
            # of the drain is served whole, which takes a while), until the port closes
            sent = []  # (seconds after the signal, future)
            with cf.ThreadPoolExecutor(64) as probes:
                while len(sent) < 600 and not any(
                    f.done() and not isinstance(f.result()[0], int) for _, f in sent[-20:]
                ):
                    sent.append(
                        (time.monotonic() - signalled, probes.submit(_try, f"{url}/v1/chat/completions", LONG, 180))
                    )
                    time.sleep(0.1)
                late = [(at, f.result()) for at, f in sent]
            results = [f.result() for f in accepted]
            labeled = [f.result() for f in labels]
        # the label requests, accepted before the signal, are answered whole (every text, every label)
        assert [c for c, _, _ in labeled] == [200] * 3, [(c, b) for c, b, _ in labeled]
        assert all(len(b["results"]) == 16 and len(b["results"][0]["probs"]) == 16 for _, b, _ in labeled)
        # README: the proxies learn of the drain within ~0.25 s idle, 0.6-0.8 s seen under heavy label
        # work; from then on every new request is a 503 (or, once the port closes, refused)
        first_503 = min(at for at, r in late if r[0] == 503)
        assert first_503 < 3, [(round(at, 2), r[0]) for at, r in late[:40]]
        assert all(r[0] != 200 for at, r in late if at > first_503 + 0.5), [(round(at, 2), r[0]) for at, r in late]
        # the port closed: refused; reset when the connection reached the kernel's backlog as the
        # listener closed; or closed unanswered when uvicorn's shutdown found it open with no request
        # read yet (it closes such a connection, as every HTTP server does with an idle keep-alive one);
        # or a drain 503's body cut as the proxy stopped (its status line came: seen once in CI).
        # None is an accepted request (those are all answered above): they come at the end, after
        # every answer (within 1 s: a probe's thread may start its request a little late)
        gone = [at for at, r in late if not isinstance(r[0], int)]
        assert {r[0] for _, r in late if not isinstance(r[0], int)} <= {
            "ConnectionRefusedError",
            "ConnectionResetError",
            "RemoteDisconnected",
            "IncompleteRead",
        } and (gone or len(late) >= 600), [(round(at, 2), r[0]) for at, r in late]
        answered = [at for at, r in late if isinstance(r[0], int)]
        assert not gone or max(answered) < min(gone) + 1.0, [(round(at, 2), r[0]) for at, r in late]
        late = [r for _, r in late]
        codes = [r[0] for r in results]
        assert all(c in (200, 503) for c in codes), codes  # never a dropped connection
        assert codes.count(200) >= 16, codes  # the 16 in flight when the signal came: answered whole
        # and they were in flight: answered after the signal (a machine fast enough to finish them in
        # 1 s would make this a test of nothing; LONG's max_tokens is what to raise then)
        assert sum(t > signalled for t in finished) >= 16, [round(t - signalled, 2) for t in finished]
        assert all(b["choices"][0]["finish_reason"] in ("stop", "length") for c, b, _ in results if c == 200)
        for c, body, headers in results + [r for r in late if isinstance(r[0], int)]:
            if c == 503:  # the drain's own 503, never "the grace period ran out" (60 s here)
                assert body["error"]["code"] == "shutting_down" and headers.get("retry-after"), (body, headers)
                assert "grace period ran out" not in body["error"]["message"], body
        late_codes = [r[0] for r in late]
        assert 503 in late_codes and all(c in (200, 503) for c in late_codes if isinstance(c, int)), late_codes
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "[serve] stopped" in out, out[-3000:]  # drained, then exit 0
        assert "core dumped" not in out.lower()
    finally:
        if proc.poll() is None:
            proc.kill()


def _stream_events(url: str, body: dict) -> list[str]:
    """The data lines of a server-sent-event stream, until it ends."""
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request(
        "POST", "/v1/chat/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"}
    )
    r = conn.getresponse()
    assert r.status == 200
    return [ln[6:] for ln in r.read().decode().splitlines() if ln.startswith("data: ")]


@pytest.mark.slow  # a server of its own for the deadline path (~30 s); the drain itself runs by default
def test_when_the_grace_period_runs_out_requests_get_a_503_and_streams_an_error_event(tiny_hf, tmp_path):
    proc, url = _start(
        tiny_hf,
        tmp_path,
        "serve.max_batch_size=16",
        "serve.max_ongoing_requests=16",
        "serve.max_new_tokens=4096",
        "serve.shutdown_grace_s=1",
    )
    slow = {**LONG, "max_tokens": 4096, "stop": ["nessuna-fine"]}  # far longer than 1.5 s + the 1 s grace
    try:
        with cf.ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(_stream_events, url, slow) for _ in range(2)]
            plain = [pool.submit(_try, f"{url}/v1/chat/completions", slow) for _ in range(4)]
            time.sleep(1.5)
            proc.send_signal(signal.SIGTERM)
            events = [f.result() for f in streams]
            results = [f.result() for f in plain]
        # a request the model ends on its own before the deadline (a random model, sampling, can draw
        # its end-of-text token) is answered whole; every other one gets the shutdown's answer
        cut = 0
        for ev in events:
            assert ev[-1] == "[DONE]", ev[-3:]
            last = json.loads(ev[-2])
            if "error" in last:
                assert last["error"]["code"] == "shutting_down", ev[-3:]  # an error event, then the end
                cut += 1
            else:
                assert last["choices"][0]["finish_reason"] == "stop", ev[-3:]
        for c, body, headers in results:
            if c == 200:
                assert body["choices"][0]["finish_reason"] == "stop", body
                continue
            assert c == 503 and body["error"]["code"] == "shutting_down" and headers.get("retry-after"), (c, body)
            cut += 1
        assert cut >= 4, cut  # 6 requests of 4096 tokens: the model ending 3 of them early would be a fluke
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
