"""The mined-sets artifact: `<out>/mine/<name>/`, and the batch plan it was mined on.

    manifest.json      identity (cache fingerprint + every setting that changes the sets), the
                       training crops the plans permute (`items`), complete plans (`plans`)
    config.json        the resolved MineConfig
    summary.json       anchor-weighted mean |P|, |A|, |N|, bytes per anchor, state checksums
    hp_pool.npy | kmeans_centroids.npy | primaps_prototypes.npy | eigen_state.npz
                       criterion state drawn once from the training split (+ `.sha256` for .npy)
    shards/e{plan:03d}/b{batch:05d}.npz + .done   one batch (file format: pipeline.mining.shards)

`MiningPlan` says which crops of a cache's training split form batch b of plan e (a pure
function of the cache's `valid`/`image_index` arrays and seed, holdout, batch size).
`MinedSets` is the one reader and writer of the directory: opening checks that it belongs to
the feature cache at hand; readers get complete plans, verified shards and the batch features;
the mine stage writes through `begin` / `write_shard` / `finish` and the state methods.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from pipeline import RELATIVE_OUT
from pipeline.artifacts.features import FeatureStore
from pipeline.artifacts.layout import NamedRunDir
from pipeline.cache.integrity import (
    CorruptArtifact,
    clean_orphans,
    hold_lock,
    read_checked,
    sha256_bytes,
    write_checked,
)
from pipeline.cache.store import (
    atomic_write_bytes,
    atomic_write_json,
    check_or_write_manifest,
    in_run,
    portable_config,
    read_json,
)
from pipeline.config.resolve import config_hash, mine_config_dict, mined_plans
from pipeline.config.schema import MineConfig
from pipeline.mining import batching, shards

log = logging.getLogger("ppap.mine")

# criterion -> its state file (criteria not listed have none)
STATE_FILES = {"hp": "hp_pool.npy", "kmeans": "kmeans_centroids.npy",
               "primaps": "primaps_prototypes.npy", "eigen": "eigen_state.npz"}


@functools.lru_cache(maxsize=8)
def _batches(seed: int, plan: int, n_items: int, batch_size: int) -> list[np.ndarray]:
    return batching.batch_plan(seed, plan, n_items, batch_size)


@dataclass(frozen=True, eq=False)
class MiningPlan:
    """Which training crops are mined, and in which batches (docs/method.md §2, §10)."""

    seed: int
    batch_size: int
    holdout: float  # fraction of training source images kept out (whole images, seeded)
    items: np.ndarray  # crops that may be mined: valid, not held out
    held: np.ndarray  # crops of the held-out source images (never mined, never trained on)

    @classmethod
    def of(cls, store: FeatureStore, seed: int, holdout: float, batch_size: int) -> "MiningPlan":
        g = store.split("train")
        valid = g["valid"][:] if "valid" in g else np.ones(store.n("train"), np.uint8)
        index = g["image_index"][:] if "image_index" in g else np.arange(store.n("train"))
        items, held = batching.holdout_split(int(seed), index, valid, float(holdout))
        return cls(int(seed), int(batch_size), float(holdout), items, held)

    @classmethod
    def for_config(cls, store: FeatureStore, cfg: MineConfig) -> "MiningPlan":
        return cls.of(store, cfg.seed, cfg.holdout, cfg.batch_size)

    def batches(self, plan: int) -> list[np.ndarray]:
        """Positions into `items` of every batch of `plan` (seeded permutation, even cuts)."""
        return _batches(self.seed, int(plan), len(self.items), self.batch_size)

    def n_batches(self, plan: int) -> int:
        return len(self.batches(plan))

    def batch_images(self, plan: int, batch: int) -> np.ndarray:
        """Crop indices (into the cache's training split) of batch `batch` of `plan`."""
        return self.items[self.batches(plan)[batch]]

    def units(self, plans: int) -> list[tuple[int, int]]:
        """(plan, batch) of every batch of the first `plans` plans."""
        return [(e, b) for e in range(plans) for b in range(self.n_batches(e))]

    def population(self) -> dict[str, Any]:
        """What the manifest records of the permuted crops: count and sha256."""
        return {"n": int(len(self.items)),
                "sha256": sha256_bytes(np.ascontiguousarray(self.items, dtype="<i8").tobytes())}


class LoadedBatch(NamedTuple):
    """One finished batch (unpacks as `store, shard, F`)."""

    store: FeatureStore
    shard: shards.Shard
    F: np.ndarray  # (B*h*w, D) float32 unit mining features of the shard's crops


@functools.lru_cache(maxsize=4)
def _load_npy_at(path: str, mtime_ns: int) -> np.ndarray:
    data = read_checked(path, what="criterion state", legacy_ok=False,
                        fix="rerun `ppap-pipe mine` with the same settings: it redraws it")
    return np.load(io.BytesIO(data))


@functools.lru_cache(maxsize=2)
def _load_state_at(path: str, mtime_ns: int, loader: Callable[[str], Any]) -> Any:
    return loader(path)


class MinedSets(NamedRunDir):
    """`<out>/mine/<name>/`. `MinedSets.open(store, name)` to read one; `MinedSets(out, name)`
    + `begin` to write one (the mine stage)."""

    SUBDIR = "mined"

    def __init__(self, out: str | Path, name: str, store: FeatureStore | None = None):
        super().__init__(out, name)
        self.store = store

    # ---------------------------------------------------------------- paths
    @property
    def summary_path(self) -> Path:
        return self.dir / "summary.json"

    def shard_path(self, plan: int, batch: int) -> Path:
        return shards.shard_path(self.dir, plan, batch)

    def state_path(self, criterion: str) -> Path | None:
        name = STATE_FILES.get(criterion)
        return self.dir / name if name else None

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def mine_command(self) -> str:
        return f"ppap-pipe mine --out {self.out} --name {self.name}"

    # ---------------------------------------------------------------- reading
    @classmethod
    def open(cls, store: FeatureStore, name: str) -> "MinedSets":
        """The mined sets `name` of `store`'s run directory; refuses missing ones and sets mined
        from another feature cache."""
        ms = cls(store.out, name, store)
        if not ms.exists():
            have = ms.layout.mined_names()
            raise ValueError(
                f"no mined sets named {name!r} under {ms.dir.parent} (found: "
                f"{', '.join(have) or 'none'}); run `{ms.mine_command()}` first, or pass the "
                "--mined name of an existing run")
        theirs = ms.identity.get("features_fingerprint")
        if theirs != store.fingerprint:
            raise ValueError(
                f"the mined sets {ms.dir} were mined from a feature cache with fingerprint "
                f"{theirs!r}, but {store.path} has fingerprint {store.fingerprint!r}; mine again "
                "from this cache (another --name) or use the cache they belong to")
        return ms

    @functools.cached_property
    def manifest(self) -> dict[str, Any]:
        return read_json(self.manifest_path)

    @property
    def identity(self) -> dict[str, Any]:
        return self.manifest.get("identity", {})

    @property
    def fingerprint(self) -> str:
        """Hash of the manifest identity (recorded by training runs)."""
        return config_hash(self.identity)

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        """The resolved config the sets were mined with ({} for a directory without one)."""
        if not self.config_path.is_file():
            return {}
        config = read_json(self.config_path)
        if config.pop(RELATIVE_OUT, False) or "out" in config:  # where the run is now
            config["out"] = str(self.out)
        return config

    def mine_config(self, **changes: Any) -> MineConfig:
        """The MineConfig of these sets (older runs say `epochs` for `plans`), with `changes`."""
        return MineConfig(**{**mine_config_dict(self.config), **changes})

    @property
    def criterion(self) -> str:
        return str(self.config.get("criterion", self.identity.get("criterion", "?")))

    @property
    def holdout(self) -> float:
        return float(self.config.get("holdout", 0.0))

    @functools.cached_property
    def plan(self) -> MiningPlan | None:
        """The batch plan the sets were mined on (None without config.json)."""
        if not self.config:
            return None
        return MiningPlan.of(self._store(), int(self.config["seed"]), self.holdout,
                             int(self.config["batch_size"]))

    @property
    def holdout_crops(self) -> np.ndarray:
        return self.plan.held if self.plan is not None else np.zeros(0, np.int64)

    def plans_done(self) -> int:
        """Consecutive plans e000, e001, ... holding at least one finished shard."""
        return shards.n_epochs(self.dir)

    def complete_plans(self) -> list[list[Path]]:
        """Shard paths of every plan the mining was asked for, in batch order; refuses
        unfinished mining (a missing plan, batch or gap)."""
        n_done = self.plans_done()
        want_plans = mined_plans(self.config) if self.config else None
        rerun = f"rerun `{self.mine_command()}` with the same settings to finish it"
        if n_done == 0 or (want_plans is not None and n_done < want_plans):
            raise ValueError(f"mining in {self.dir} is unfinished ({n_done} of "
                             f"{want_plans or '?'} batch plans complete); {rerun}")
        plans = []
        for e in range(want_plans or n_done):
            paths = [Path(p) for p in shards.iter_shards(self.dir, e)]
            n = self.plan.n_batches(e) if self.plan is not None else len(paths)
            if [p.name for p in paths] != [self.shard_path(e, b).name for b in range(n)]:
                raise ValueError(f"mining in {self.dir} is unfinished (plan {e} has {len(paths)} "
                                 f"of {n} batches, or a gap); {rerun}")
            plans.append(paths)
        return plans

    def finished_shards(self, plan: int) -> dict[int, Path]:
        """batch -> shard path of the finished batches of `plan` (which must exist)."""
        n_done = self.plans_done()
        if not 0 <= plan < n_done:
            raise ValueError(f"mined sets {self.name!r} have {n_done} finished epoch(s); "
                             f"epoch={plan} does not exist, pick --epoch below {max(n_done, 1)} "
                             "(or finish mining)")
        return {int(shards.read_marker(p)["batch"]): Path(p)
                for p in shards.iter_shards(self.dir, plan)}

    def check_checksums(self, plans: list[list[Path]]) -> None:
        """Refuse shards without a checksum (older ppap-pipe), reading markers only."""
        for plan in plans:
            for p in plan:
                if shards.read_marker(p).get("sha256") is None:
                    raise ValueError(f"{p} was mined by an older ppap-pipe and has no checksum; "
                                     f"{shards.remine_hint(p)}")

    def read_shard(self, plan: int, batch: int) -> shards.Shard:
        """A finished shard, verified against its checksum."""
        path = self.shard_path(plan, batch)
        if not shards.is_done(path):
            raise ValueError(f"batch {batch} of epoch {plan} is not mined in {self.dir} "
                             f"(no {path.name} with its .done marker); check --epoch/--batch or "
                             "rerun `ppap-pipe mine`")
        return shards.read_shard(path)

    def load_batch(self, plan: int, batch: int) -> LoadedBatch:
        """(store, shard, F) of one finished batch."""
        shard = self.read_shard(plan, batch)
        store = self._store()
        return LoadedBatch(store, shard, store.mining_features(shard.images))

    def _store(self) -> FeatureStore:
        if self.store is None:
            self.store = FeatureStore(self.out)
        return self.store

    # ---------------------------------------------------------------- writing (mine stage)
    def begin(self, identity: dict[str, Any], config: dict[str, Any],
              population: dict[str, Any]) -> dict[str, Any]:
        """Lock the directory, remove temporary files, check or write the manifest (other
        settings or other crops are refused), save the config; returns the manifest record.

        A directory written by a version that recorded no crops keeps its shards only if they
        verify; its criterion state is dropped (it may come from other crops)."""
        hold_lock(self.dir, "mined-set directory")
        clean_orphans(self.dir)
        existed = self.manifest_path.is_file()
        record = check_or_write_manifest(self.manifest_path, identity,
                                         extra={"config": portable_config(
                                                    config, self.manifest_path, self.out),
                                                "items": population},
                                         what="mined-set directory")
        if existed and self._legacy_population(population):
            for name in ("hp_pool.npy", "kmeans_centroids.npy"):
                (self.dir / name).unlink(missing_ok=True)
        atomic_write_json(self.config_path, portable_config(config, self.config_path, self.out))
        self.__dict__.pop("config", None)
        self.__dict__.pop("manifest", None)
        return record

    def _legacy_population(self, population: dict[str, Any]) -> bool:
        """Refuse shards mined on other crops; True for a directory of an older version."""
        old = read_json(self.manifest_path).get("items")
        if old is None:
            log.warning("mine: %s was written by an older ppap-pipe that recorded neither the "
                        "crops it mined nor shard checksums; every shard is mined again", self.dir)
            return True
        if old != population:
            raise ValueError(
                f"{self.dir} was mined on {old.get('n')} training crops, but the feature cache "
                f"now has {population['n']} usable ones (it changed since, e.g. it was unfinished "
                "when mining started), so its batch plans differ; delete that directory or mine "
                "under another --name")
        return False

    def todo(self, units: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Units without an intact shard; logs why finished-looking shards are mined again."""
        todo, redo = [], {"legacy": [], "corrupt": []}
        for u in units:
            state, why = shards.shard_state(self.shard_path(*u))
            if state != "ok":
                todo.append(u)
            if state in redo:
                redo[state].append(why)
        if redo["corrupt"]:
            log.warning("mine: re-mining %d shard(s) that fail their checksum or marker: %s",
                        len(redo["corrupt"]), "; ".join(redo["corrupt"][:3]))
        if redo["legacy"]:
            log.warning("mine: re-mining %d shard(s) written without a checksum by an older "
                        "ppap-pipe", len(redo["legacy"]))
        return todo

    def write_shard(self, plan: int, batch: int, mined: Any, images: np.ndarray, criterion: str,
                    meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write one batch's shard, then its marker (pipeline.mining.shards.write_shard)."""
        return shards.write_shard(self.shard_path(plan, batch), mined, plan, batch, images,
                                  criterion, meta=meta)

    def count_complete_plans(self, plan: MiningPlan) -> int:
        """Leading plans of `plan` whose every batch is finished."""
        e = 0
        while all(shards.is_done(self.shard_path(e, b)) for b in range(plan.n_batches(e))):
            e += 1
        return e

    def shard_summary(self, units: list[tuple[int, int]]) -> dict[str, Any]:
        """Anchor-weighted means over the markers of the given shards."""
        stats = [shards.read_marker(self.shard_path(*u)) for u in units]
        n = sum(s["n_anchors"] for s in stats)

        def mean(key: str) -> float:
            return sum(s[key] * s["n_anchors"] for s in stats) / max(n, 1)

        return {
            "dir": str(self.dir), "shards": len(stats), "anchors": n,
            "mean_pos": mean("mean_pos"), "mean_amb": mean("mean_amb"),
            "mean_neg": mean("mean_neg"),
            "anchors_without_positive": sum(s["anchors_without_positive"] for s in stats),
            "bytes_per_anchor": sum(s["bytes"] for s in stats) / max(n, 1),
        }

    def finish(self, record: dict[str, Any], summary: dict[str, Any], config: dict[str, Any],
               population: dict[str, Any], plans: int) -> dict[str, Any]:
        """Write summary.json (+ state checksums); the manifest then says what the directory
        holds now (`plans` complete, extended plans included)."""
        summary = {**summary, "criterion_state": self.state_checksums()}
        # on disk the directory is named relative to the run, so a moved run stays true
        atomic_write_json(self.summary_path, {**summary, "dir": in_run(self.dir, self.out)})
        atomic_write_json(self.manifest_path, {
            **record, "config": portable_config(config, self.manifest_path, self.out),
            "items": population, "plans": plans})
        self.__dict__.pop("manifest", None)
        return summary

    # ---------------------------------------------------------------- criterion state
    def save_state_array(self, criterion: str, arr: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, arr)
        write_checked(self.state_path(criterion), buf.getvalue())  # + <path>.sha256

    def load_state_array(self, criterion: str) -> np.ndarray:
        """Verified state array, read once per process (keyed by the file's mtime)."""
        path = str(self.state_path(criterion))
        return _load_npy_at(path, os.stat(path).st_mtime_ns)

    def save_state_bytes(self, criterion: str, data: bytes) -> None:
        atomic_write_bytes(self.state_path(criterion), data)

    def load_state(self, criterion: str, loader: Callable[[str], Any]) -> Any:
        """`loader(path)` of a state file, once per process (keyed by the file's mtime)."""
        path = str(self.state_path(criterion))
        return _load_state_at(path, os.stat(path).st_mtime_ns, loader)

    def state_ok(self, criterion: str, repair: bool,
                 loader: Callable[[str], Any] | None = None) -> bool:
        """Whether saved state can be used; with `repair`, a corrupt or unverifiable file is
        dropped so that it is drawn again (it is a pure function of seed and cache)."""
        path = self.state_path(criterion)
        if not path.exists():
            return False
        if not repair:
            return True
        try:
            if loader is None:
                self.load_state_array(criterion)
            else:
                self.load_state(criterion, loader)
            return True
        except (CorruptArtifact, ValueError, OSError, KeyError) as exc:
            log.warning("mine: %s; drawing it again", exc)
            path.unlink(missing_ok=True)
            return False

    def state_checksums(self) -> dict[str, str]:
        """sha256 of the criterion state files present (recorded in summary.json)."""
        import hashlib

        return {name: hashlib.sha256((self.dir / name).read_bytes()).hexdigest()
                for name in STATE_FILES.values() if (self.dir / name).is_file()}
