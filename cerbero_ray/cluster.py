"""What the stages may ask of the Ray cluster this process runs on, checked before they ask.

:mod:`cerbero_ray.runtime` records whether it started the cluster itself (the embedded one: one
machine, no autoscaler); on that cluster a request it cannot meet would wait forever, so the stages
check theirs first (:func:`check_fits`). :func:`host_free_memory`: what this machine has free, for the
checks only a worker can make (a KV cache's size)."""

from __future__ import annotations

import errno

_EMBEDDED = {"here": False}


def host_free_memory() -> int | None:
    """This host's available memory in bytes: Linux's MemAvailable, within the cgroup's limit where
    one is set (a container's MemAvailable is its machine's); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                free = min(free, int(limit) - int(g.read()))
    except (OSError, ValueError):
        pass
    return free


def started_here(embedded: bool) -> None:
    """Record that this process started (True) or stopped (False) an embedded cluster."""
    _EMBEDDED["here"] = embedded


RAY_UNIT = 1e-4  # the smallest share of a resource Ray schedules (a task asking for less is refused)


def actor_share(cpus: float, workers: int, what: str) -> float:
    """One of ``workers`` actors' share of ``cpus`` CPUs; a ``ValueError`` naming ``what`` when it is
    under Ray's smallest (:data:`RAY_UNIT`): Ray would stop the job with a traceback about precision."""
    share = cpus / workers
    if share < RAY_UNIT:
        raise ValueError(
            f"{what}: {workers:,} actors on {cpus:g} CPU(s) would get {share:.2g} CPU each, under the "
            f"{RAY_UNIT:g} Ray can schedule; give fewer workers"
        )
    return share


def check_fits(need: dict[str, float], what: str) -> None:
    """On the embedded cluster (one machine, no autoscaler: what it lacks never comes), a
    ``ValueError`` naming ``what`` when ``need`` (resource -> amount, e.g. every Ray Train worker's
    GPUs together, or one model actor's) exceeds what the cluster has; Ray would otherwise wait for
    it forever, repeating "No available node types can fulfill resource request". An attached
    cluster may scale up to it, so nothing is checked there."""
    if not _EMBEDDED["here"]:
        return
    import ray

    have = ray.cluster_resources()
    short = {k: v for k, v in need.items() if v > have.get(k, 0) + 1e-9}
    if short:
        wants = ", ".join(f"{v:g} {k}" for k, v in short.items())
        has = ", ".join(f"{have.get(k, 0):g} {k}" for k in short)
        raise ValueError(
            f"{what} needs {wants}; the embedded Ray cluster has {has}. Lower it, or attach a cluster "
            "that has them (cluster.address=…, or ray job submit)"
        )


def check_listen(host: str, port: int, what: str) -> None:
    """On the embedded cluster (its proxy listens on this machine), a ``ValueError`` naming ``what``
    when ``host``:``port`` cannot be listened on: a port another program holds, or a host that is
    not an address of this machine. Ray Serve's proxy would otherwise fail to bind, retry, and end
    the job with a page of tracebacks. An attached cluster's proxies listen on its nodes: nothing
    is checked there."""
    import socket

    if not _EMBEDDED["here"]:
        return
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"{what}: cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a closed socket's TIME_WAIT is no hold
        try:
            s.bind(addr)
        except OSError as e:
            held = " (another server holds it? pick another port)" if e.errno == errno.EADDRINUSE else ""
            raise ValueError(f"{what}: cannot listen on {host}:{port}: {e.strerror}{held}") from None
