"""Pipeline stages. Each module exposes `run(cfg)`; the CLI (`stages/cli.py`) only builds the
config and calls it."""
