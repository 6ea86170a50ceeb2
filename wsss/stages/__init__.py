"""One module per stage, each with `run(cfg, ctx) -> dict` (the dict goes into the stage's manifest)."""
