"""Pipeline stages. Each module exposes `run(cfg)`; the CLI only builds the config and calls it."""
