"""The generate stage: ``run_generate(cfg)`` (in :mod:`cerbero_ray.generate.pipeline`), loaded on first use so that
importing a module of this package does not import Ray."""


def __getattr__(name: str):
    if name == "run_generate":
        from cerbero_ray.generate.pipeline import run_generate

        return run_generate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
