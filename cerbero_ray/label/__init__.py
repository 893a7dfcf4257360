"""The label stage: ``run_label(cfg)`` (in :mod:`cerbero_ray.label.pipeline`), loaded on first use so that
importing a module of this package does not import Ray."""


def __getattr__(name: str):
    if name == "run_label":
        from cerbero_ray.label.pipeline import run_label

        return run_label
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
