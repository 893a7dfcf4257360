"""Starting the endpoint: ``run_serve(cfg)`` deploys the app on an initialised Ray and returns its URL."""

from __future__ import annotations

import logging
import os

from omegaconf import DictConfig

from cerbero_ray.checkpoints import check_inference, check_served_adapter
from cerbero_ray.cluster import check_fits, check_listen
from cerbero_ray.config import check
from cerbero_ray.config.serve import ServeConfig, ServeStageConfig
from cerbero_ray.logs import our_error

log = logging.getLogger(__name__)


def run_serve(cfg: DictConfig | dict | ServeStageConfig, blocking: bool = False) -> str:
    """Deploy the app; returns the base URL. ``blocking`` keeps serving until interrupted."""
    from ray import serve

    from cerbero_ray.serve.app import deployment

    sc = check("serve", cfg).serve
    check_inference(sc.checkpoint, sc.engine, "serve")
    for name, path in sc.adapters.items():  # object-store ones too, before the app is deployed
        check_served_adapter(path, f"serve.adapters.{name}")
    # Python's handlers replace the C++ stack dump Ray installs for SIGTERM; set before deploying,
    # so a signal during start-up is a clean stop too (once the app is up)
    stop = stop_on_signals() if blocking else None
    check_fits(
        {"CPU": sc.cpus_per_replica, "GPU": sc.gpus_per_replica},
        f"serve.cpus_per_replica={sc.cpus_per_replica:g} and serve.gpus_per_replica={sc.gpus_per_replica:g}",
    )
    check_listen(sc.host, sc.port, "serve.host and serve.port")
    control()  # before the app: the proxies find it at their first request
    serve.start(http_options={"host": sc.host, "port": sc.port})
    try:
        serve.run(deployment(sc), name="cerbero", route_prefix="/", blocking=False)
    except RuntimeError:  # "Deploying application cerbero failed": what its replica raised is in Serve's status
        why = our_error(replica_failure("cerbero") or "")
        serve.delete("cerbero")  # nothing left retrying on the cluster
        if why is not None:  # a check of ours in the replica: a bad setting, one line
            raise ValueError(f"the model replica did not start: {why}") from None
        raise
    url = f"http://{sc.host}:{sc.port}"
    auth = ' -H "Authorization: Bearer $CERBERO_API_KEY"' if sc.api_key else ""
    log.info(
        f"[serve] {sc.model_name} ({sc.checkpoint}) at {url}\n"
        + "".join(f'[serve] adapter {n} ({p}): "model": "{n}"\n' for n, p in sc.adapters.items())
        + f"[serve] chat page: {url}/\n"
        f"[serve] try: curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
        f'-d \'{{"messages": [{{"role": "user", "content": "Ciao! Come stai?"}}], "max_tokens": 32}}\'',
    )
    if blocking:
        serve_until_signalled(sc, stop)
    return url


def replica_failure(app: str) -> str | None:
    """What a replica of ``app`` raised when it failed to start, with its traceback (Serve's status
    keeps it), or None."""
    from ray import serve

    status = serve.status().applications.get(app)
    failed = [d.message for d in status.deployments.values() if d.status == "DEPLOY_FAILED"] if status else []
    return failed[0] if failed else None


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


def serve_until_signalled(sc: ServeConfig, stop: _Stop | None = None) -> None:
    """Serve until SIGTERM (systemd, Kubernetes, ``ray job stop``) or Ctrl-C, then shut down in
    order: the app is deleted first — its replicas take no new request and finish the ones in
    flight, for up to ``serve.shutdown_grace_s`` — then Serve and Ray stop, and the process exits 0."""
    import ray
    from ray import serve

    stop = stop or stop_on_signals()
    while not stop.event.wait(1.0):
        pass
    if not gcs_reachable():
        _ray_stopped_too(stop.signum)
    # on a loaded machine Ray's processes may take longer than that to go: watched during the drain
    draining = _watch_gcs(stop.signum)
    log.info(f"[serve] stopping: finishing in-flight requests (up to {sc.shutdown_grace_s} s)")
    if not drain(sc.shutdown_grace_s):  # no proxy of ours (set RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH):
        serve.delete("cerbero")  # Serve's own graceful stop, which drops the requests still queued
    draining.set()  # our own shutdown stops the embedded cluster's GCS next
    serve.shutdown()
    ray.shutdown()
    log.info("[serve] stopped")


def _ray_stopped_too(signum: int) -> None:
    """The same signal reached Ray's own processes (sent to the whole process group or cgroup:
    systemd's default KillMode, `timeout`, `kill -- -PGID`): nothing is left to drain through, and
    Serve's shutdown would wait a minute for a GCS that is gone. Says so and exits at once."""
    log.warning(
        "[serve] Ray's own processes were stopped by the same signal, so in-flight requests are lost; "
        "signal this process only (systemd: KillMode=mixed) to let them finish",
    )
    os._exit(128 + signum)


def _watch_gcs(signum: int):
    """A daemon thread that exits as :func:`_ray_stopped_too` if the GCS goes away before the
    returned event is set."""
    import threading

    done = threading.Event()

    def watch():
        while not done.wait(0.5):
            if not gcs_reachable(0) and not done.is_set():
                _ray_stopped_too(signum)

    threading.Thread(target=watch, name="cerbero-gcs-watch", daemon=True).start()
    return done


def control():
    """The drain's control actor (:class:`cerbero_ray.serve.proxy.ServeControl`), made or reset."""
    import ray

    from cerbero_ray.serve.proxy import CONTROL, ServeControl

    actor = (
        ray.remote(ServeControl).options(name=CONTROL[0], namespace=CONTROL[1], get_if_exists=True, num_cpus=0).remote()
    )
    ray.get(actor.reset.remote())
    _HELD[:] = [actor]  # an actor lives while a handle does: this driver holds one for as long as it serves
    return actor


_HELD: list = []


def drain(grace_s: float) -> bool:
    """Start the drain and wait until no proxy holds a request (they answer new ones 503 and, at the
    deadline, the ones left 503 too); False when no proxy of ours reported (nothing to wait on)."""
    import time

    import ray

    from cerbero_ray.serve.proxy import CONTROL, POLL_S

    actor = ray.get_actor(CONTROL[0], namespace=CONTROL[1])
    ray.get(actor.drain.remote(grace_s))
    give_up = time.monotonic() + grace_s + 10 * POLL_S + 5
    while time.monotonic() < give_up:
        held, proxies, seen = ray.get(actor.held.remote())
        if proxies == 0:
            return False
        if seen and held == 0:
            return True
        time.sleep(POLL_S)
    return True
