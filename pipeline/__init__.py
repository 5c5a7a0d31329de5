"""ppap-pipe: offline, reproducible PPAP mining and training on cached ViT features."""

__version__ = "0.1.0"
# Bumped whenever an on-disk layout changes; stores written with another value are refused.
FORMAT_VERSION = 1
