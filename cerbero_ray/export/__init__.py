"""The export stage: ``run_export(cfg)`` (in :mod:`cerbero_ray.export.pipeline`), loaded on first use."""


def __getattr__(name: str):
    if name == "run_export":
        from cerbero_ray.export.pipeline import run_export

        return run_export
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
