"""The serving metrics without Ray: what a request records (:class:`ServeMetrics` on recording
stand-ins for ``ray.serve.metrics``), that recording never fails a request, the load gauges the
engine's loop sets, and the engine's own timings. The export through Ray's metrics agent is
tests/test_serve.py's (scraped from the running server)."""

import logging
import time
from collections import defaultdict

import pytest

from cerbero_ray.inference.continuous import ContinuousBatcher
from cerbero_ray.inference.sampling import Sampling
from cerbero_ray.models import tiny
from cerbero_ray.serve.metrics import ServeMetrics


class _Recorder:
    """``ray.serve.metrics``' three classes, recording each call as (name, value, tags)."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = defaultdict(list), fail
        rec = self

        class Metric:
            def __init__(self, name, description="", tag_keys=None, boundaries=None):
                self.name, self.tag_keys = name, tuple(tag_keys or ())

            def _record(self, value, tags=None):
                if rec.fail:
                    raise RuntimeError("the metrics agent is gone")
                assert set(tags or {}) == set(self.tag_keys), (self.name, tags)  # as Ray checks them
                rec.calls[self.name].append((value, dict(tags or {})))

            inc = observe = set = _record

        def histogram(name, description="", boundaries=None, tag_keys=None):
            assert boundaries == sorted(boundaries)
            return Metric(name, description, tag_keys)

        self.Counter, self.Gauge, self.Histogram = Metric, Metric, histogram


def test_a_request_records_its_tokens_and_times():
    r = _Recorder()
    m = ServeMetrics(r)
    answers = [  # two choices of one request
        {"finish_reason": "length", "prompt_tokens": 12, "new_tokens": 5, "first_token_s": 0.1, "seconds": 0.5},
        {"finish_reason": "stop", "prompt_tokens": 12, "new_tokens": 1, "first_token_s": 0.2, "seconds": 0.2},
    ]
    m.generated("sentiment-it", "chat", answers, 0.6)
    tags = {"model": "sentiment-it"}
    assert r.calls["cerbero_requests"] == [(1, {**tags, "endpoint": "chat", "finish_reason": "length"})]
    assert r.calls["cerbero_prompt_tokens"] == [(12, tags)]  # the prompt once, whatever n
    assert r.calls["cerbero_generated_tokens"] == [(6, tags)]
    assert "cerbero_cached_prompt_tokens" not in r.calls  # an engine without prefix reuse says nothing
    assert r.calls["cerbero_time_to_first_token_seconds"] == [(0.1, tags), (0.2, tags)]
    # the tokens after the first, each: (0.5 - 0.1) / 4; a one-token answer has none
    assert r.calls["cerbero_time_per_output_token_seconds"] == [(pytest.approx(0.1), tags)]
    assert r.calls["cerbero_request_seconds"] == [(0.6, {**tags, "endpoint": "chat"})]
    m.generated("cerbero", "text", [{"finish_reason": "stop", "prompt_tokens": 3, "new_tokens": 0}], 0.1)
    assert r.calls["cerbero_generated_tokens"] == [(6, tags)]  # nothing generated, nothing added
    assert len(r.calls["cerbero_time_to_first_token_seconds"]) == 2  # an answer without the engine's time
    reused = {"finish_reason": "stop", "prompt_tokens": 40, "cached_tokens": 32, "new_tokens": 2}
    m.generated("cerbero", "chat", [reused, {**reused, "cached_tokens": 39}], 0.1)
    assert r.calls["cerbero_cached_prompt_tokens"] == [(32, {"model": "cerbero"})]  # as the prompt: the first choice's
    m.failed("cerbero", "text")
    assert r.calls["cerbero_requests"][-1] == (1, {"model": "cerbero", "endpoint": "text", "finish_reason": "error"})
    m.labeled("cerbero", "sentiment", 4, 0.3)
    assert r.calls["cerbero_label_texts"] == [(4, {"model": "cerbero", "task": "sentiment"})]


def test_recording_never_fails_a_request(caplog):
    m = ServeMetrics(_Recorder(fail=True))
    with caplog.at_level(logging.WARNING, logger="cerbero_ray.serve.metrics"):
        for _ in range(3):
            m.generated("cerbero", "chat", [{"finish_reason": "stop", "prompt_tokens": 1, "new_tokens": 1}], 0.1)
            m.failed("cerbero", "chat")
            m.labeled("cerbero", "irony", 1, 0.1)
    said = [x.getMessage() for x in caplog.records]
    assert len(said) == 1 and "the metrics agent is gone" in said[0]  # once, not per request


def test_the_engine_loop_sets_the_load_gauges_and_times_each_request(tok):
    r = _Recorder()
    m = ServeMetrics(r)
    cb = ContinuousBatcher(tiny().eval(), tok, num_slots=2, max_prompt_tokens=64, max_new_tokens=8)
    cb.on_step = m.load_hook(cb, every_s=3600)  # between the first step and the last: no update
    s = Sampling(max_new_tokens=6, temperature=0.0, stop=())
    out = cb.run([("Ciao!", s), ("Come stai?", s), ("Dimmi una cosa.", s)])
    deadline = time.time() + 10
    while r.calls["cerbero_running_requests"][-1:] != [(0, {})] and time.time() < deadline:
        time.sleep(0.01)
    running, waiting = r.calls["cerbero_running_requests"], r.calls["cerbero_waiting_requests"]
    assert running[0][0] in (1, 2) and running[-1] == (0, {}) and waiting[-1] == (0, {})  # the first step, the last
    assert len(running) <= 3  # throttled: not one per step (each request took 6)
    for x in out:
        assert 0 < x["first_token_s"] <= x["seconds"]
    assert "cerbero_prefix_store_bytes" not in r.calls  # no store, no gauge
    # an observer that raises never stops the loop
    cb.on_step = lambda: 1 / 0
    assert [x["text"] for x in cb.run([("Ciao!", s)])] == [out[0]["text"]]
    cb.close()
    # with a host prefix store: what it holds, in bytes (whole pages)
    kw = dict(num_slots=1, max_prompt_tokens=128, max_new_tokens=8, prefix_store_bytes=2**22)
    cb = ContinuousBatcher(tiny().eval(), tok, **kw)
    cb.run([(f"Scrivi una frase sul {w} " * 6, s) for w in ("mare", "monte")])  # the second takes the first's slot
    m.load(cb)
    page = cb.store.page_tokens * cb.slots.token_bytes()
    assert cb.store.used >= 1 and r.calls["cerbero_prefix_store_bytes"][-1] == (cb.store.used * page, {})
    cb.close()
