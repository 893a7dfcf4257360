"""A bounded load test on loopback (fixed request count and time): zero 5xx (overload is answered
429 + Retry-After), and with max_replicas=2 the replica count rises under load and falls after."""

import concurrent.futures as cf
import threading
import time

import pytest
from test_serve import post

from cerbero_ray.config import compose, to_container
from conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # scales up and back down: minutes of waiting


def running(serve):
    states = serve.status().applications["cerbero"].deployments["cerbero"].replica_states
    return states.get("RUNNING", 0)


def test_replicas_rise_under_load_and_fall_after(tiny_hf, ray_local):
    from ray import serve

    from cerbero_ray.serve.service import run_serve

    c = to_container(
        compose(
            "serve",
            [
                f"serve.checkpoint={tiny_hf}",
                f"serve.port={free_port()}",
                "serve.cpus_per_replica=0.5",
                "serve.min_replicas=1",
                "serve.max_replicas=2",
                "serve.target_ongoing_requests=1",
                "serve.upscale_delay_s=1",
                "serve.downscale_delay_s=3",
                "serve.metrics_interval_s=0.5",
                "serve.look_back_period_s=2",
                "serve.max_ongoing_requests=4",
                "serve.max_queued_requests=8",
                "serve.overload_status=429",
                "serve.max_batch_size=1",
                "serve.max_new_tokens=48",
                "serve.default_max_tokens=48",
            ],
        )
    )
    url = run_serve(c)
    try:
        assert running(serve) == 1
        body = {"messages": [{"role": "user", "content": "Raccontami una storia."}], "max_tokens": 48}
        stop, codes, peak = threading.Event(), [], [1]

        def client():
            while not stop.is_set() and len(codes) < 600:
                codes.append(post(f"{url}/v1/chat/completions", body, key=None)[0])

        with cf.ThreadPoolExecutor(8) as pool:
            for _ in range(8):
                pool.submit(client)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and peak[0] < 2:
                peak[0] = max(peak[0], running(serve))
                time.sleep(0.5)
            stop.set()
        assert peak[0] == 2, "did not scale up under load"
        assert codes and all(code in (200, 429) for code in codes), sorted(set(codes))
        assert codes.count(200) > 0
        deadline = time.monotonic() + 90
        while running(serve) > 1 and time.monotonic() < deadline:
            time.sleep(1)
        assert running(serve) == 1, "did not scale down after the load"
    finally:
        serve.shutdown()
