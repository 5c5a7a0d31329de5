"""`ppap-pipe export`: one mined batch as .npz in the documented export format.

Reads one finished shard of `<out>/mine/<mined>/` (pipeline.artifacts.mined.MinedSets, which
checks that the sets belong to this feature cache and verifies the shard's checksum) and writes
`features` (N x D float32, exactly what the miner used), `anchors`, the CSR positive and
ambiguous sets, `proxy`, `phi`, `psi` and, for a labelled cache, `patch_label` and
`image_index` (pipeline.mining.recover.export_batch).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from pipeline.artifacts.features import FeatureStore, take_rows
from pipeline.artifacts.mined import MinedSets
from pipeline.cache.store import atomic_write_bytes
from pipeline.config.schema import ExportConfig
from pipeline.mining.recover import export_batch

log = logging.getLogger("ppap.export")


def run(cfg: ExportConfig) -> Path:
    """Write batch `cfg.batch` of plan `cfg.epoch` of the mined sets `cfg.mined` to `cfg.to`."""
    store, shard, F = MinedSets.open(FeatureStore(cfg.out), cfg.mined).load_batch(cfg.epoch,
                                                                                  cfg.batch)
    labels = None
    if store.has_labels:
        labels = take_rows(store.split("train")["patch_labels"], shard.images)
    data = export_batch(F, shard, patch_labels=labels, image_index=shard.images)
    buf = io.BytesIO()
    np.savez(buf, **data)
    to = Path(cfg.to)
    atomic_write_bytes(to, buf.getvalue())
    log.info("export: epoch %d batch %d of %s -> %s (%d rows, %d anchors)", cfg.epoch, cfg.batch,
             cfg.mined, to, len(F), len(shard.anchors))
    return to
