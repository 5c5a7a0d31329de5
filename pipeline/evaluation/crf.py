"""Dense CRF post-processing (docs/method.md §6), per image, parallel over images.

Per image at evaluation resolution, on the un-normalised uint8 RGB image:
unary = -log(clip(prob, 1e-5)); Gaussian kernel sxy=1, compat=3; bilateral kernel sxy=67,
srgb=3, compat=4; 10 mean-field iterations. Cluster scores enter as softmax(2 * cosine).
`CRFPool` keeps worker processes alive across batches; `refine_argmax` is the one-shot form.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger("ppap.crf")


@dataclass(frozen=True)
class CRFParams:
    gauss_sxy: float = 1.0
    gauss_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0
    iterations: int = 10
    clip: float = 1e-5  # probabilities are clipped from below before the log


DEFAULT = CRFParams()


def softmax(scores: np.ndarray, axis: int = 0, scale: float = 1.0) -> np.ndarray:
    """Numerically stable softmax(scale * scores) in float32."""
    s = np.asarray(scores, dtype=np.float32) * np.float32(scale)
    s = s - s.max(axis=axis, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=axis, keepdims=True)


def cluster_probs(cosine: np.ndarray, axis: int = 0) -> np.ndarray:
    """Cluster scores as CRF input: softmax(2 * cosine) over the cluster axis."""
    return softmax(cosine, axis=axis, scale=2.0)


def _check(image: np.ndarray, probs: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"CRF image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"CRF probabilities must be (C, H, W) = (C, {image.shape[0]}, "
                         f"{image.shape[1]}) to match the image, got {probs.shape}; "
                         "upsample scores to the image size first")


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams = DEFAULT) -> np.ndarray:
    """Refined (C, H, W) float32 probabilities of one image."""
    import pydensecrf.densecrf as dcrf

    image = np.asarray(image)
    probs = np.asarray(probs)
    _check(image, probs)
    c, h, w = probs.shape
    unary = -np.log(np.clip(probs.astype(np.float32, copy=False), params.clip, None))
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(c, -1), dtype=np.float32))
    d.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    d.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                           rgbim=np.ascontiguousarray(image), compat=params.bilateral_compat)
    q = d.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def _label_dtype(c: int):
    return np.uint8 if c <= 256 else np.int32


def crf_argmax(image: np.ndarray, probs_list: Sequence[np.ndarray], params: CRFParams = DEFAULT
               ) -> list[np.ndarray]:
    """CRF-refined argmax label maps of one image, one per probability map in `probs_list`
    (e.g. cluster and linear scores of the same image)."""
    return [dense_crf(image, p, params).argmax(0).astype(_label_dtype(p.shape[0]))
            for p in probs_list]


def resolve_workers(workers: int) -> int:
    """0 = all cores (this process's CPU affinity)."""
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0 (0 = all cores)")
    if workers == 0:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    return workers


class CRFPool:
    """Worker processes for per-image CRF; workers=1 runs in this process.

    `submit(image, probs_list)` returns a Future of `crf_argmax(...)`; results do not depend on
    the number of workers. Use as a context manager.
    """

    def __init__(self, workers: int = 0, params: CRFParams = DEFAULT):
        self.workers = resolve_workers(workers)
        self.params = params
        self._ex: ProcessPoolExecutor | None = None
        if self.workers > 1:
            # spawn: the parent may hold torch/OpenMP threads, which fork does not copy safely
            self._ex = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        log.debug("dense CRF: %d worker process(es)", self.workers)

    def submit(self, image: np.ndarray, probs_list: Sequence[np.ndarray]) -> Future:
        if self._ex is not None:
            return self._ex.submit(crf_argmax, image, list(probs_list), self.params)
        fut: Future = Future()
        try:
            fut.set_result(crf_argmax(image, list(probs_list), self.params))
        except BaseException as exc:  # surface on .result(), like a pool would
            fut.set_exception(exc)
        return fut

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
            self._ex = None

    def __enter__(self) -> "CRFPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def refine_argmax(
    images: Iterable[np.ndarray], probs: Iterable[np.ndarray | Sequence[np.ndarray]], *,
    workers: int = 0, params: CRFParams = DEFAULT, progress: bool = True, desc: str = "crf",
) -> list:
    """CRF argmax maps for each (image, probs) pair, in input order.

    `probs[i]` is one (C, H, W) array (result: one label map) or a sequence of them (result: a
    list of label maps, one per array). workers: processes (0 = all cores, 1 = this process).
    """
    images = list(images)
    probs = list(probs)
    if len(images) != len(probs):
        raise ValueError(f"{len(images)} images but {len(probs)} probability maps; give one per image")
    single = [isinstance(p, np.ndarray) for p in probs]
    results: list = [None] * len(images)
    from pipeline.executor import progress as progress_bar

    with CRFPool(workers, params) as pool, progress_bar(total=len(images), desc=desc, unit="img",
                                                        disable=not progress) as bar:
        window = 2 * pool.workers  # bounded number of images in flight (memory)
        pending: dict[int, Future] = {}
        for i, (img, p) in enumerate(zip(images, probs)):
            pending[i] = pool.submit(img, [p] if single[i] else p)
            if len(pending) >= window:
                j = min(pending)
                results[j] = pending.pop(j).result()
                bar.update(1)
        for j in sorted(pending):
            results[j] = pending[j].result()
            bar.update(1)
    return [r[0] if s else r for r, s in zip(results, single)]
