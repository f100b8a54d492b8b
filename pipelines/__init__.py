"""Pipeline stages: each is `run(cfg, ctx) -> outputs` plus a thin `main()`."""
