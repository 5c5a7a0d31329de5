"""The presets: each paper configuration's (and the DINOv2 presets') settings, one table per stage.

Values from the authors' released configs (docs/method.md §4); the DINOv2 tables were chosen on
CamVid *training* crops and held-out training images (docs/results.md), never on the evaluation
split. Every key must be a field of that stage's config (tests check it)."""

from __future__ import annotations

from typing import Any

# Presets (docs/method.md §4 for the paper's; §9 for DINOv2 thresholds on CamVid/demo).
# A preset holds one table per stage (`features`, `mine`, `train`, `eval`); a stage config
# takes only its own table, so a key means one thing (the mining batch is not the forward-pass
# batch, mined plans are not training epochs). Every key must be a field of that stage's config
# (checked by `resolve`). dataset/backbone belong to `features` only: the later stages read them
# from the feature cache's manifest.
PRESET_TABLES = ("features", "mine", "train", "eval")

_PAPER_MINE = dict(batch_size=64)  # crops per mined batch = per training step


_PAPER_TRAIN = dict(grad_clip=10.0, probe_lr=1e-3, cluster_lr=1e-3)


# The DINOv2 presets' mining and training tables (camvid, demo); why: the comment at "camvid".
_DINOV2_MINE = dict(phi0=0.95, psi0=0.70, prop_iters=2, sigma_pos=3.0, sigma_amb=3.0,
                    anchors_per_image="1/16", plans=2, eigen_kernel_power=4.0)

_DINOV2_TRAIN = dict(tau=0.1, epochs=2, optimizer="adamw", lr=1e-3, weight_decay=0.01,
                     select_every=10, **_PAPER_TRAIN)


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "cocostuff27-vits8": {
        "features": dict(dataset="cocostuff27", backbone="dino_vits8"),
        "mine": dict(phi0=0.55, psi0=0.20, prop_iters=2, sigma_pos=3.0, sigma_amb=3.0,
                     anchors_per_image="1/16", plans=5, **_PAPER_MINE),
        "train": dict(tau=0.8, epochs=5, optimizer="adamw", lr=1e-3, weight_decay=0.1,
                      **{**_PAPER_TRAIN, "cluster_lr": 5e-3}),
    },
    "cocostuff27-vits16": {
        "features": dict(dataset="cocostuff27", backbone="dino_vits16"),
        "mine": dict(phi0=0.55, psi0=0.15, prop_iters=2, sigma_pos=3.0, sigma_amb=4.0,
                     anchors_per_image="1/4", plans=5, **_PAPER_MINE),
        "train": dict(tau=0.8, epochs=5, optimizer="adamw", lr=1e-3, weight_decay=0.01,
                      **_PAPER_TRAIN),
    },
    "cityscapes-vitb8": {
        "features": dict(dataset="cityscapes", backbone="dino_vitb8"),
        "mine": dict(phi0=0.60, psi0=0.20, prop_iters=3, sigma_pos=3.0, sigma_amb=2.0,
                     anchors_per_image="1/16", plans=30, **_PAPER_MINE),
        "train": dict(tau=0.1, epochs=30, optimizer="adam", lr=1e-3, weight_decay=0.0,
                      **_PAPER_TRAIN),
    },
    "cityscapes-vits8": {
        "features": dict(dataset="cityscapes", backbone="dino_vits8"),
        "mine": dict(phi0=0.60, psi0=0.20, prop_iters=3, sigma_pos=3.0, sigma_amb=3.0,
                     anchors_per_image="1/16", plans=30, **_PAPER_MINE),
        "train": dict(tau=0.8, epochs=30, optimizer="adam", lr=1e-3, weight_decay=0.0,
                      **_PAPER_TRAIN),
    },
    "potsdam-vitb8": {
        "features": dict(dataset="potsdam", backbone="dino_vitb8"),
        "mine": dict(phi0=0.55, psi0=0.15, prop_iters=1, sigma_pos=5.0, sigma_amb=3.0,
                     anchors_per_image="1/16", plans=40, **_PAPER_MINE),
        "train": dict(tau=0.07, epochs=40, optimizer="adam", lr=5e-4, weight_decay=0.0,
                      **_PAPER_TRAIN),
    },
    # DINOv2 features share a large common component (median pairwise cosine 0.47 on
    # CamVid), so the DINO v1 thresholds collapse; 0.95/0.70 was picked with the audit
    # sweep on CamVid *training* crops (docs/method.md §9), never on the evaluation split.
    # eigen_kernel_power: with the DINOv2 common component, max(0, cos) gives a kernel whose
    # normalised spectrum collapses after ~3 eigenvalues (CamVid train: 1, .66, .21, .10, .05,
    # ...), so the later eigenfunctions are noise; max(0, cos)^4 keeps a gradual spectrum
    # (1, .93, .66, .49, .28, ...). Measured on training crops only (docs/results.md, eigen criterion).
    # Training recipe (tau 0.1, AdamW 1e-3, 2 epochs, selection every 10 steps): chosen by
    # `sweep-train` on held-out *training* images (docs/results.md, "choosing the training recipe"):
    # tau 0.8 collapses the code (held-out effective rank 0.5x frozen), tau <= 0.2 does not.
    "camvid": {
        "features": dict(dataset="camvid", data_root="../shared/camvid",
                         backbone="dinov2_vits14_offline"),
        "mine": {**_DINOV2_MINE, **_PAPER_MINE},
        "train": dict(_DINOV2_TRAIN),
        "eval": dict(eigen_kernel_power=4.0),
    },
    "demo": {  # the camvid recipe on the embedded mosaics, in batches of 16; a smoke test,
        # so one probe seed keeps `make features mine train eval` quick
        "features": dict(dataset="demo", backbone="dinov2_vits14_offline"),
        "mine": {**_DINOV2_MINE, "batch_size": 16},
        "train": dict(_DINOV2_TRAIN),
        "eval": dict(eigen_kernel_power=4.0, seeds=1),
    },
}
