"""ppap-pipe: offline, reproducible PPAP mining and training on cached ViT features."""

__version__ = "0.1.0"
# Bumped whenever an on-disk layout changes; stores written with another value are refused.
FORMAT_VERSION = 1
# Key of a saved config.json whose `out` is written relative to the file's own folder (e.g.
# "../.." for <out>/mine/<name>/config.json): `--config FILE` resolves it against FILE's folder,
# so a run directory that was moved or copied still names itself (pipeline.cache.store.portable_config).
RELATIVE_OUT = "_out_relative_to_this_file"
