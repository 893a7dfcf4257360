"""The data stage: ``run_data(cfg)`` (in :mod:`cerbero_ray.data.pipeline`), loaded on first use so that
importing a module of this package does not import Ray."""


def __getattr__(name: str):
    if name == "run_data":
        from cerbero_ray.data.pipeline import run_data

        return run_data
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
