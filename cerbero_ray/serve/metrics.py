"""What a replica generates, as Prometheus metrics through Ray's metrics agent, beside Serve's own
request counts and latencies (``ray_serve_*``): the figures an operator of an LLM endpoint watches.

Each name gets Ray's ``ray_`` prefix and Serve's ``deployment``, ``replica`` and ``application``
tags (``ray.serve.metrics``); Prometheus scrapes every node's metrics agent (the Ray dashboard's
metrics page and Grafana read the same). Per served model (``model``: the base or an adapter):

- ``cerbero_requests_total`` (``endpoint``: chat, text, label; ``finish_reason``: stop, length, or
  ``error`` for a generation that failed after it was accepted);
- ``cerbero_prompt_tokens_total``, ``cerbero_generated_tokens_total``, ``cerbero_label_texts_total``;
- ``cerbero_cached_prompt_tokens_total``: of the prompt tokens, those the continuous engine reused
  from a cache slot or its host prefix store instead of computing them (prefix reuse; their ratio
  is its hit rate);
- ``cerbero_time_to_first_token_seconds``: from the engine's admission of a request to its first
  token (the continuous engine; a stream on the hf engine: to its first piece);
- ``cerbero_time_per_output_token_seconds``: each later token, on average over a request;
- ``cerbero_request_seconds``: a request end to end in the replica;
- ``cerbero_running_requests`` and ``cerbero_waiting_requests``: the continuous engine's decoding
  slots in use and its queue, and ``cerbero_prefix_store_bytes`` what its host prefix store holds
  (``serve.prefix_store_gib``; not set without one), set by its loop (at most every half second,
  and when it empties).

Recording never fails a request: an error there is logged once and the metric is left alone.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2]
REQUEST_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0]


class ServeMetrics:
    """The replica's metrics. ``factory``: the module whose ``Counter``, ``Gauge`` and ``Histogram``
    make them (``ray.serve.metrics``; a test passes its own)."""

    def __init__(self, factory=None):
        if factory is None:
            from ray.serve import metrics as factory
        C, G, H = factory.Counter, factory.Gauge, factory.Histogram
        self.requests = C("cerbero_requests", "Requests answered", ("model", "endpoint", "finish_reason"))
        self.prompt_tokens = C("cerbero_prompt_tokens", "Prompt tokens of the requests answered", ("model",))
        self.generated_tokens = C("cerbero_generated_tokens", "Tokens generated", ("model",))
        self.cached_tokens = C(
            "cerbero_cached_prompt_tokens",
            "Prompt tokens reused from a cache slot or the host prefix store (prefix reuse)",
            ("model",),
        )
        self.label_texts = C("cerbero_label_texts", "Texts labeled", ("model", "task"))
        self.ttft = H(
            "cerbero_time_to_first_token_seconds",
            "From a request's admission to its first token",
            boundaries=TTFT_BUCKETS,
            tag_keys=("model",),
        )
        self.tpot = H(
            "cerbero_time_per_output_token_seconds",
            "Each token after the first, on average over a request",
            boundaries=TPOT_BUCKETS,
            tag_keys=("model",),
        )
        self.latency = H(
            "cerbero_request_seconds",
            "A request end to end in the replica",
            boundaries=REQUEST_BUCKETS,
            tag_keys=("model", "endpoint"),
        )
        self.running = G("cerbero_running_requests", "Decoding slots in use (continuous engine)")
        self.waiting = G("cerbero_waiting_requests", "Requests waiting for a slot (continuous engine)")
        self.store = G("cerbero_prefix_store_bytes", "Bytes the host prefix store holds (continuous engine)")
        self._failed = False

    def _safe(self, fn) -> None:
        try:
            fn()
        except Exception as e:  # a metric is never worth a failed request
            if not self._failed:
                log.warning(f"recording a serving metric failed (logged once): {e!r}")
            self._failed = True

    def generated(self, model: str, endpoint: str, results: list[dict], seconds: float) -> None:
        """One request's answers (``n`` choices: one dict each, as the engines return them)."""

        def record():
            tags = {"model": model}
            new = sum(r["new_tokens"] for r in results)
            self.requests.inc(1, {**tags, "endpoint": endpoint, "finish_reason": results[0]["finish_reason"]})
            self.prompt_tokens.inc(results[0]["prompt_tokens"], tags)
            if results[0].get("cached_tokens"):
                self.cached_tokens.inc(results[0]["cached_tokens"], tags)
            if new:
                self.generated_tokens.inc(new, tags)
            for r in results:
                first = r.get("first_token_s")
                if first is not None:
                    self.ttft.observe(first, tags)
                    if r["new_tokens"] > 1 and r.get("seconds") is not None:
                        self.tpot.observe((r["seconds"] - first) / (r["new_tokens"] - 1), tags)
            self.latency.observe(seconds, {**tags, "endpoint": endpoint})

        self._safe(record)

    def failed(self, model: str, endpoint: str) -> None:
        self._safe(lambda: self.requests.inc(1, {"model": model, "endpoint": endpoint, "finish_reason": "error"}))

    def labeled(self, model: str, task: str, texts: int, seconds: float) -> None:
        def record():
            self.requests.inc(1, {"model": model, "endpoint": "label", "finish_reason": "stop"})
            self.label_texts.inc(texts, {"model": model, "task": task})
            self.latency.observe(seconds, {"model": model, "endpoint": "label"})

        self._safe(record)

    def load(self, batcher) -> None:
        """The continuous engine's slots in use and queue now, and what its host prefix store holds."""

        def record():
            self.running.set(len(batcher.live))
            self.waiting.set(len(batcher.waiting))
            if batcher.store is not None:
                self.store.set(batcher.store.held_bytes)

        self._safe(record)

    def load_hook(self, batcher, every_s: float = 0.5):
        """What the engine's loop calls after each step: :meth:`load` at most every ``every_s``
        seconds, and whenever the engine has emptied (its last step leaves the gauges at 0)."""
        import time

        last = [float("-inf")]

        def hook() -> None:
            now = time.monotonic()
            if now - last[0] >= every_s or not (batcher.live or batcher.waiting):
                last[0] = now
                self.load(batcher)

        return hook
