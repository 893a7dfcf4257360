"""Starting the endpoint: ``run_serve(cfg)`` deploys the app on an initialised Ray and returns its URL."""

from __future__ import annotations

from omegaconf import DictConfig

from cerbero_ray.config import to_container
from cerbero_ray.generate.slots import check_engine
from cerbero_ray.models import INFERENCE_DTYPES, check_checkpoint


def validate_serve_config(sc: dict) -> None:
    """``ValueError`` naming the key, before any replica starts."""
    if not 1 <= sc["min_replicas"] <= sc["max_replicas"]:
        raise ValueError(f"serve.min_replicas ({sc['min_replicas']}) must be >= 1 and <= serve.max_replicas ({sc['max_replicas']})")
    if sc["overload_status"] not in (503, 429):
        raise ValueError(f"serve.overload_status must be 503 or 429, got {sc['overload_status']}")
    for k in ("max_ongoing_requests", "max_queued_requests", "max_batch_size", "max_prompt_tokens", "max_new_tokens",
              "default_max_tokens", "max_label_texts", "port"):
        if int(sc[k]) < 1:
            raise ValueError(f"serve.{k} must be >= 1, got {sc[k]}")
    if sc["default_max_tokens"] > sc["max_new_tokens"]:
        raise ValueError("serve.default_max_tokens must be <= serve.max_new_tokens")
    if sc["dtype"] not in INFERENCE_DTYPES:
        raise ValueError(f"serve.dtype must be one of {INFERENCE_DTYPES}, got {sc['dtype']!r}")
    check_checkpoint(sc["checkpoint"], "serve.checkpoint")
    check_engine(sc["engine"], "serve.engine", sc["checkpoint"])


def run_serve(cfg: DictConfig | dict, blocking: bool = False) -> str:
    """Deploy the app; returns the base URL. ``blocking`` keeps serving until interrupted."""
    from ray import serve

    from cerbero_ray.serve.app import deployment

    c = to_container(cfg) if isinstance(cfg, DictConfig) else cfg
    sc = c["serve"]
    validate_serve_config(sc)
    serve.start(http_options={"host": sc["host"], "port": sc["port"]})
    serve.run(deployment(sc), name="cerbero", route_prefix="/", blocking=False)
    url = f"http://{sc['host']}:{sc['port']}"
    auth = ' -H "Authorization: Bearer $CERBERO_API_KEY"' if sc.get("api_key") else ""
    print(f"[serve] {sc['model_name']} ({sc['checkpoint']}) at {url}\n"
          f"[serve] chat page: {url}/\n"
          f"[serve] try: curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
          f"-d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"Ciao! Come stai?\"}}], \"max_tokens\": 32}}'",
          flush=True)
    if blocking:
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url
