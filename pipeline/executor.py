"""Map a stage's per-unit function over units: in this process, or through dask.

Stage code handles one unit (a chunk, a batch) and writes its own region plus a marker; this
module only schedules. Units that already have their marker are skipped by the caller.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Sequence

from tqdm import tqdm

log = logging.getLogger("ppap.executor")


class StageInterrupted(RuntimeError):
    pass


PROGRESS_EVERY_S = 30.0  # progress lines in log files (stderr not a terminal)


class _LineStream:
    """File for tqdm when stderr is not a terminal: each refresh becomes one whole line (no
    carriage returns), so log lines never glue onto a progress bar in a log file."""

    def __init__(self, stream):
        self.stream = stream
        self.last = None

    def write(self, s: str) -> None:
        text = s.replace("\r", "").strip()
        key = text.split(" [", 1)[0]  # the count, without timings: no repeated final line
        if text and key != self.last:
            self.stream.write(text + "\n")
            self.last = key

    def flush(self) -> None:
        self.stream.flush()


def progress(total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0,
             disable: bool = False, **kw: Any) -> tqdm:
    """THE progress bar of every stage: live on a terminal; on a log file, one plain line at
    start, every PROGRESS_EVERY_S seconds and at the end. None at all when nothing is left."""
    if total is not None and total - initial <= 0:
        disable = True
    stream = sys.stderr
    if stream is not None and hasattr(stream, "isatty") and stream.isatty():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                    dynamic_ncols=True, mininterval=0.5, **kw)
    return _LogTqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                    file=_LineStream(stream), mininterval=PROGRESS_EVERY_S, ascii=True, ncols=100,
                    **kw)


class _LogTqdm(tqdm):
    """tqdm for log files: postfix changes do not print a line of their own."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


@contextmanager
def timed(what: str, logger: logging.Logger = log):
    t0 = time.perf_counter()
    logger.info("%s ...", what)
    yield
    logger.info("%s done in %.1fs", what, time.perf_counter() - t0)


def run_units(
    fn: Callable[..., Any],
    units: Sequence[Any],
    *,
    args: tuple = (),
    workers: int = 0,
    scheduler: str | None = None,
    desc: str = "units",
    unit_weight: Callable[[Any], int] | None = None,
    rate_unit: str = "it",
    retries: int = 1,
    on_result: Callable[[Any, Any], None] | None = None,
) -> list[Any]:
    """Call fn(unit, *args) for every unit; returns results in the order of `units`.

    workers=0 and scheduler=None run in this process (tests, debugging). Otherwise a local
    dask cluster of `workers` single-threaded processes, or the scheduler at `scheduler`.
    The progress bar counts `unit_weight(unit)` items per unit (e.g. images) so it shows a rate.
    """
    units = list(units)
    results: list[Any] = [None] * len(units)
    total = sum(unit_weight(u) for u in units) if unit_weight else len(units)
    bar = progress(total=total, desc=desc, unit=rate_unit)
    try:
        if not units:
            return results
        if workers == 0 and scheduler is None:
            for i, u in enumerate(units):
                results[i] = fn(u, *args)
                if on_result:
                    on_result(u, results[i])
                bar.update(unit_weight(u) if unit_weight else 1)
            return results
        with _dask_client(workers, scheduler) as client:
            futures = client.map(fn, units, *[[a] * len(units) for a in args], pure=False, retries=retries)
            index = {f.key: i for i, f in enumerate(futures)}
            from distributed import as_completed

            try:
                for fut in as_completed(futures):
                    i = index[fut.key]
                    results[i] = fut.result()
                    if on_result:
                        on_result(units[i], results[i])
                    bar.update(unit_weight(units[i]) if unit_weight else 1)
            except BaseException:
                client.cancel(futures)
                raise
        return results
    except KeyboardInterrupt:
        raise StageInterrupted(
            f"interrupted during {desc}: finished units are kept; rerun the same command to resume"
        ) from None
    finally:
        bar.close()


@contextmanager
def _dask_client(workers: int, scheduler: str | None):
    from distributed import Client, LocalCluster

    if scheduler is not None:
        client = Client(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
        silence_logs=logging.WARNING,
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
