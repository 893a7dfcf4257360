"""The train stage: ``run_train(cfg)`` (in :mod:`cerbero_ray.train.trainer`), loaded on first use so that
importing a module of this package does not import Ray."""


def __getattr__(name: str):
    if name == "run_train":
        from cerbero_ray.train.trainer import run_train

        return run_train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
