"""The artifact layer: one typed reader/writer per artifact of a run directory `<out>`.

| artifact | class | module |
|---|---|---|
| every path under `<out>` | `RunLayout` | `layout` |
| feature cache `features.zarr` (+ manifest, markers) | `FeatureStore` (read), `FeatureCacheWriter` | `features` |
| mined sets `mine/<name>/` and their batch plan | `MinedSets`, `MiningPlan` | `mined` |
| training run `train/<name>/` and its checkpoints | `TrainRun`, `Checkpoint` | `training` |
| evaluation report `eval/<name>/` | `EvalReport` | `reports` |

Each class owns its paths, its manifest (fingerprint checks, refusal to mix), its completeness
rules (markers written last) and its checksums; stages call these classes and never join run
paths or read another stage's files themselves. Import the submodules directly (this package
imports nothing, so reading a path does not load torch or zarr).
"""
