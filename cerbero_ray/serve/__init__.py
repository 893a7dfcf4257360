"""The serve stage: ``run_serve(cfg)`` (in :mod:`cerbero_ray.serve.service`), loaded on first use so that
importing a module of this package does not import Ray."""


def __getattr__(name: str):
    if name == "run_serve":
        from cerbero_ray.serve.service import run_serve

        return run_serve
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
