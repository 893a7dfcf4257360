"""Starting the endpoint: ``run_serve(cfg)`` deploys the app on an initialised Ray and returns its URL."""

from __future__ import annotations

import os
import sys

from omegaconf import DictConfig

from cerbero_ray.config import check
from cerbero_ray.serve.engine import check_servable


def run_serve(cfg: DictConfig | dict, blocking: bool = False) -> str:
    """Deploy the app; returns the base URL. ``blocking`` keeps serving until interrupted."""
    from ray import serve

    from cerbero_ray.serve.app import deployment

    sc = check("serve", cfg)["serve"]
    check_servable(sc)
    # Python's handlers replace the C++ stack dump Ray installs for SIGTERM; set before deploying,
    # so a signal during start-up is a clean stop too (once the app is up)
    stop = stop_on_signals() if blocking else None
    serve.start(http_options={"host": sc["host"], "port": sc["port"]})
    serve.run(deployment(sc), name="cerbero", route_prefix="/", blocking=False)
    url = f"http://{sc['host']}:{sc['port']}"
    auth = ' -H "Authorization: Bearer $CERBERO_API_KEY"' if sc.get("api_key") else ""
    print(
        f"[serve] {sc['model_name']} ({sc['checkpoint']}) at {url}\n"
        f"[serve] chat page: {url}/\n"
        f"[serve] try: curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
        f'-d \'{{"messages": [{{"role": "user", "content": "Ciao! Come stai?"}}], "max_tokens": 32}}\'',
        flush=True,
    )
    if blocking:
        serve_until_signalled(sc, stop)
    return url


def gcs_reachable(wait_s: float = 1.0) -> bool:
    """Whether the cluster's GCS still takes connections, watched for ``wait_s`` (a process
    signalled together with this one takes a moment to exit)."""
    import socket
    import time

    import ray

    host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                pass
        except OSError:
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.2)


class _Stop:
    """Set by SIGTERM or SIGINT; remembers the first signal."""

    def __init__(self):
        import threading

        self.event, self.signum = threading.Event(), None

    def __call__(self, signum, _frame):
        self.signum = self.signum or signum
        self.event.set()


def stop_on_signals() -> _Stop:
    import signal

    stop = _Stop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    return stop


def serve_until_signalled(sc: dict, stop: _Stop | None = None) -> None:
    """Serve until SIGTERM (systemd, Kubernetes, ``ray job stop``) or Ctrl-C, then shut down in
    order: the app is deleted first — its replicas take no new request and finish the ones in
    flight, for up to ``serve.shutdown_grace_s`` — then Serve and Ray stop, and the process exits 0."""
    import ray
    from ray import serve

    stop = stop or stop_on_signals()
    while not stop.event.wait(1.0):
        pass
    if not gcs_reachable():
        # the same signal reached Ray's own processes (sent to the whole process group or cgroup:
        # systemd's default KillMode, `timeout`, `kill -- -PGID`): nothing is left to drain through,
        # and Serve's shutdown would wait a minute for a GCS that is gone
        print(
            "[serve] Ray's own processes were stopped by the same signal, so in-flight requests are lost; "
            "signal this process only (systemd: KillMode=mixed) to let them finish",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + stop.signum)
    print(f"[serve] stopping: finishing in-flight requests (up to {sc['shutdown_grace_s']} s)", flush=True)
    serve.delete("cerbero")
    serve.shutdown()
    ray.shutdown()
    print("[serve] stopped", flush=True)
