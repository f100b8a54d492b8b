"""Pipeline stages (each is `run(cfg, ctx) -> outputs` plus a thin `main()`) and the Python API, `load_run`."""


def __getattr__(name: str):
    # The API loads torch and the models: imported on first use, so `python -m pipelines.X --help` stays fast.
    if name in ("load_run", "Run", "GeneratedNet"):
        from pipelines.zeroshot import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load_run", "Run", "GeneratedNet"]
