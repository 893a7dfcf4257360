"""Starting the endpoint: ``run_serve(cfg)`` deploys the app on an initialised Ray and returns its URL."""

from __future__ import annotations

from omegaconf import DictConfig

from cerbero_ray.config import check
from cerbero_ray.serve.engine import check_servable


def run_serve(cfg: DictConfig | dict, blocking: bool = False) -> str:
    """Deploy the app; returns the base URL. ``blocking`` keeps serving until interrupted."""
    from ray import serve

    from cerbero_ray.serve.app import deployment

    sc = check("serve", cfg)["serve"]
    check_servable(sc)
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
        serve_until_signalled(sc)
    return url


def serve_until_signalled(sc: dict) -> None:
    """Serve until SIGTERM (systemd, Kubernetes, ``ray job stop``) or Ctrl-C, then shut down in
    order: the app is deleted first — its replicas take no new request and finish the ones in
    flight, for up to ``serve.shutdown_grace_s`` — then Serve and Ray stop, and the process exits 0."""
    import signal
    import threading

    import ray
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    print(f"[serve] stopping: finishing in-flight requests (up to {sc['shutdown_grace_s']} s)", flush=True)
    serve.delete("cerbero")
    serve.shutdown()
    ray.shutdown()
    print("[serve] stopped", flush=True)
