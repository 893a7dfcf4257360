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
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url
