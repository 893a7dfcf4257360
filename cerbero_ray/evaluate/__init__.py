"""The evaluate stage: ``run_evaluate(cfg)`` (in :mod:`cerbero_ray.evaluate.pipeline`), loaded on
first use so that importing a module of this package does not import Ray."""


def __getattr__(name: str):
    if name == "run_evaluate":
        from cerbero_ray.evaluate.pipeline import run_evaluate

        return run_evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
