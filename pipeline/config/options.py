"""The building blocks of the stage configs: `option` (a field with its CLI help and spelling),
the names a setting may take (criteria, probes, checkpoints, selection metrics) and the checks
several configs share (fractions, devices, dask workers, mining thresholds)."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any


def parse_fraction(value: str | float | int) -> float:
    """'1/16' -> 0.0625, 'all' -> 1.0, '0.25' -> 0.25; must lie in (0, 1]."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return 1.0
        try:
            frac = float(Fraction(text))
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"anchors_per_image={value!r} is not a fraction; use e.g. '1/16', '0.25' or 'all'"
            ) from None
    else:
        frac = float(value)
    if not (0.0 < frac <= 1.0) or math.isnan(frac):
        raise ValueError(
            f"anchors_per_image={value!r} must lie in (0, 1]; use e.g. '1/16' or 'all'"
        )
    return frac


def _check_device(device: str) -> None:
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device={device!r} is not supported; use 'cpu' or 'cuda' (or 'cuda:N')")


def _check_workers(workers: int, scheduler: str | None) -> None:
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0 (0 runs in this process)")
    if scheduler is not None and workers:
        raise ValueError(
            f"give either workers={workers} or scheduler={scheduler!r}, not both"
        )


def option(default: Any, help: str, *, flags: tuple[str, ...] | None = None,
           cli: bool = True) -> Any:
    """A config field with its command-line help text. `flags` spells the option when it is not
    `flag_name(field)`; `cli=False` keeps a field out of the command line (config files only)."""
    return dataclasses.field(default=default, metadata={"help": help, "flags": flags, "cli": cli})


def flag_name(name: str) -> str:
    """The command-line spelling of an option name: plans -> --plans, crf_workers -> --crf-workers."""
    return "--" + name.replace("_", "-")


def option_flags(f: dataclasses.Field) -> tuple[str, ...]:
    """The spellings of a config field's option: its `flags`, else `flag_name(name)`."""
    return f.metadata.get("flags") or (flag_name(f.name),)


# help texts shared by several stages' fields
OUT_HELP = "Run directory (default data_cache/<preset or demo>)."


DEVICE_HELP = "cpu, cuda or cuda:N."


WORKERS_HELP = "Local dask worker processes (0 = in this process)."


SCHEDULER_HELP = "Address of an existing dask scheduler."


SEED_HELP = "Seed for every random choice of this stage."


CRITERIA = ("ppap", "p0", "hp", "kmeans", "primaps", "eigen")


PROBES = ("kmeans", "primaps-em", "eigen")  # how eval fits the cluster probe (EvalConfig.probe)


def _check_seed_system(cfg: Any) -> None:
    """Shared checks of the PriMaPs / eigenfunction options (MineConfig and EvalConfig)."""
    if not 0.0 <= cfg.primaps_psi < 1.0:
        raise ValueError(f"primaps_psi={cfg.primaps_psi} must lie in [0, 1) (PriMaPs uses 0.4)")
    if not 0.0 < cfg.primaps_coverage <= 1.0:
        raise ValueError(f"primaps_coverage={cfg.primaps_coverage} must lie in (0, 1] "
                         "(PriMaPs stops at 0.95)")
    if cfg.eigen_dim is not None and cfg.eigen_dim < 1:
        raise ValueError(f"eigen_dim={cfg.eigen_dim} must be at least 1 (or omitted = clusters)")
    if cfg.eigen_steps <= 0:
        raise ValueError(f"eigen_steps={cfg.eigen_steps} must be a positive integer")
    if not cfg.eigen_kernel_power > 0:
        raise ValueError(f"eigen_kernel_power={cfg.eigen_kernel_power} must be > 0")


SELECT_METRICS = ("cluster_miou", "linear_miou", "labelfree")


CHECKPOINTS = ("best", "last", "labelfree")  # train/<run>/<name>.pt


def check_mine_params(phi0: float, psi0: float, prop_iters: int, sigma_pos: float,
                      sigma_amb: float) -> None:
    """Checks of the mining parameters, shared by MineConfig and pipeline.mining.sets.MineParams."""
    for name, v in (("phi0", phi0), ("psi0", psi0)):
        if not (-1.0 <= float(v) <= 1.0):
            raise ValueError(f"{name}={v} must be a cosine in [-1, 1]")
    if int(prop_iters) != prop_iters or prop_iters < 0:
        raise ValueError(f"prop_iters={prop_iters} must be an integer >= 0 (0 = anchor itself)")
    for name, v in (("sigma_pos", sigma_pos), ("sigma_amb", sigma_amb)):
        if not float(v) > 0:
            raise ValueError(f"{name}={v} must be > 0 (it divides the proxy movement)")
