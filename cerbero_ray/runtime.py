"""The one place that starts or attaches Ray.

- ``cluster.address: null`` starts an embedded local cluster in this process, or, inside a job
  submitted with ``ray job submit`` (``RAY_ADDRESS`` is set), attaches to that job's cluster.
- ``cluster.address: <addr>`` attaches to a running cluster (``auto``, ``host:6379``, ``ray://…``).

Token authentication (Ray ≥ 2.52, ``RAY_AUTH_MODE=token``) needs nothing here: an embedded cluster
makes its own token, and attaching reads ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``/the default
token file as Ray does. Dashboards bind to 127.0.0.1 unless the config says otherwise.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from cerbero_ray import cluster as cluster_state
from cerbero_ray.config.common import ClusterConfig
from cerbero_ray.logs import OUR_ERRORS, our_error

log = logging.getLogger(__name__)


def init_ray(cluster: ClusterConfig) -> dict:
    """Start or attach Ray as the ``cluster`` config says; returns the cluster's resources."""
    import ray

    from cerbero_ray.logs import quiet

    quiet()
    if ray.is_initialized():
        return ray.cluster_resources()
    address = cluster.address
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = "auto"  # running as a submitted job
    if address is None:
        kwargs = dict(
            num_cpus=cluster.num_cpus or os.cpu_count(),
            include_dashboard=cluster.dashboard,
            dashboard_host=cluster.dashboard_host,
        )
        if cluster.object_store_memory_gb:
            kwargs["object_store_memory"] = int(cluster.object_store_memory_gb * 2**30)
        if cluster.metrics_export_port:
            kwargs["_metrics_export_port"] = int(cluster.metrics_export_port)
        # Ray Serve's proxy answers overload and timeouts in our JSON error format (serve/proxy.py); the
        # variable reaches the proxy through the raylet this process starts
        from cerbero_ray.serve.proxy import PROXY_CALLBACK

        os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
        ray.init(namespace=cluster.namespace, log_to_driver=True, **kwargs)
        cluster_state.started_here(True)
        log.info("started an embedded Ray cluster: %s", ray.cluster_resources())
    else:
        ray.init(address=address, namespace=cluster.namespace)
        log.info("attached to the Ray cluster at %s: %s", address, ray.cluster_resources())
    from ray.data import DataContext

    from cerbero_ray.storage import retried_io_errors

    ctx = DataContext.get_current()
    # object stores under load: Ray Data retries these on top of the S3 client's own retries
    ctx.retried_io_errors = list(dict.fromkeys([*ctx.retried_io_errors, *retried_io_errors()]))
    ctx.enable_progress_bars = cluster.progress_bars
    if not ctx.enable_progress_bars:  # our bars and summaries stand in for Ray Data's console lines
        from cerbero_ray.logs import quiet_ray_data

        quiet_ray_data()
    return ray.cluster_resources()


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster_state.started_here(False)


LAUNCHED: dict = {}  # set once launch() has the composed config: Hydra's exit 1 after that is not a config error


def hydra_job(main) -> None:
    """A job's ``if __name__ == "__main__"``: its Hydra ``main()``, with a config Hydra cannot
    compose (a misspelled key, a value of the wrong type, an option that is not there) exiting 2
    as every other config error does, not Hydra's 1 (its message stays as Hydra prints it)."""
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and not LAUNCHED:
            sys.exit(2)
        raise


def launch(stage: str, cfg, run=None, ray: bool | None = None, **kwargs):
    """What every ``jobs/<stage>.py`` does: check the composed config and the stage's local input (a
    bad key or value, a missing local input or manifest, is one line naming the key and exit status
    2, before Ray starts), start or attach Ray (unless ``ray=False``), and call ``run(cfg)``. What
    the run itself finds wrong with its input (a ``ValueError`` or file error raised by our code, here
    or in a Ray task or actor: a model actor whose cache does not fit) is one line and exit status 2
    as well (``HYDRA_FULL_ERROR=1`` shows the stack); a SIGTERM or Ctrl-C, one line and 128 + the
    signal."""
    from cerbero_ray.config import check
    from cerbero_ray.config.stages import STAGES, precheck

    ray = STAGES[stage].ray if ray is None else ray
    LAUNCHED[stage] = True
    try:
        c = check(stage, cfg)
        precheck(stage, c)  # what it reads of its local input and output (a manifest, a run record)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    # the stage table's run_<stage>, unless given (tests); imported after the checks: a stage's module
    # may import torch and transformers (seconds), which a config error need not wait for
    run = run or STAGES[stage].runner()
    if ray:
        init_ray(c.cluster)
    interrupt_on_sigterm()  # after ray.init, which installs a C++ stack dump for SIGTERM
    try:
        return run(c, **kwargs)
    except Exception as e:
        why = str(e) if isinstance(e, OUR_ERRORS) and _ours(e) else _ours_elsewhere(e)
        if why is not None and os.environ.get("HYDRA_FULL_ERROR") != "1":
            print(f"error: {why}", file=sys.stderr, flush=True)  # what the run found wrong with its input or config
            sys.exit(2)
        # object storage gone for good (after the client's retries): one line, resumable
        gone = _storage_error(e)
        if gone is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        hint = _resume(stage)
        print(f"error: object storage: {gone}{hint}", file=sys.stderr, flush=True)
        sys.exit(75)  # EX_TEMPFAIL: try again later
    except KeyboardInterrupt:
        how = STOPPED_BY.get("signal", signal.SIGINT)
        hint = _resume(stage)
        print(f"[{stage}] stopped by {signal.Signals(how).name}{hint}", file=sys.stderr, flush=True)
        sys.exit(128 + how)


def _resume(stage: str) -> str:
    from cerbero_ray.config.stages import STAGES

    return f"; {STAGES[stage].resume}" if stage in STAGES else ""


def _chain(e: BaseException | None):
    """``e`` and what it wraps, once each: its causes and contexts, and a Ray error's ``cause`` (the
    worker's exception)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__


def _storage_error(e: BaseException) -> str | None:
    """The first line of a storage failure in ``e`` or what it wraps (a Ray task's error carries
    the worker's), or None when ``e`` is something else."""
    from cerbero_ray.storage import StorageError

    for x in _chain(e):
        if isinstance(x, StorageError) or (isinstance(x, OSError) and "AWS Error" in str(x)):
            return str(x).strip().splitlines()[0]
    return None


def _ours_elsewhere(e: BaseException) -> str | None:
    """The message of a check of ours that failed in another process: a Ray task that raised it,
    or an actor (a model actor of a batch job) whose start it stopped; None for anything else."""
    for x in _chain(e):
        why = our_error(str(x)) if type(x).__module__.startswith("ray.") else None  # the remote traceback
        if why is not None:
            return f"a model actor did not start: {why}" if getattr(x, "actor_init_failed", False) else why
    return None


def _ours(e: BaseException) -> bool:
    """Whether ``e`` was raised by this package's own code (a check that names what is wrong), not
    inside a library it called (a bug, or a failure whose stack the user needs)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(here)


STOPPED_BY: dict = {}


def interrupt_on_sigterm() -> None:
    """SIGTERM (``ray job stop``, Kubernetes, systemd) stops a job as Ctrl-C does: a
    ``KeyboardInterrupt`` in the main thread, so Ray Data and Ray Train wind down, the job prints one
    line and exits 143, instead of Ray's C++ handler dumping a stack and aborting."""

    def on_sigterm(signum, _frame):
        STOPPED_BY["signal"] = signum
        raise KeyboardInterrupt(signal.Signals(signum).name)  # what stopped it, for a tracker run's record

    signal.signal(signal.SIGTERM, on_sigterm)
