"""Influence bounds, applied to the replies that passed validation (``fedsq_app.core.replies``).

Rejecting outliers alone lets an attacker choose any update just inside the bound, in any direction.
Here every update's influence is bounded instead, whatever its direction:

- **Centered norm clipping** (Sun et al. 2019, "Can you really backdoor FL?"): each update
  Δ_k = x_k − x_t on the trainable parameters is scaled to at most τ_k = τ · max(1, w_k / median w)^¼,
  τ = ``clip-multiplier`` × the round's median ‖Δ‖ and w the server's weights (a larger silo takes more
  local steps). The median of the norms is the round's exact 50 % quantile (Andrew et al. 2021 estimate a
  quantile privately across rounds because a DP server must not see the norms; this server sees them).
  A minority cannot move the median out of the honest range, so one reply of n shifts the weighted mean by
  at most its weight share × (τ_k + ‖honest mean‖), pointing anywhere.
- **Direction bound**: each update's component *against* the round's coordinate-wise median update
  (Yin et al. 2018: a minority cannot move a coordinate's median out of the honest range) is removed;
  what points along it or across it is kept. A reversed update (undoing the honest step at any length)
  is left with only its part orthogonal to the consensus, so the length bound above need not be tight,
  and honest silos with long updates (one-class data, many local steps) are rarely clipped.
- **BN running statistics clamp**: each coordinate of each reply's ``running_mean`` / ``running_var`` is
  clamped into the range the other replies span (the 2nd smallest to the 2nd largest value), so one silo
  cannot move them beyond the honest spread.

Pure functions of checked replies (objects with ``arrays`` and ``num_examples``) and the global model's
arrays. Below 3 replies a median cannot tell which reply is the outlier: the two-silo mode then clips to
``clip-multiplier`` × the *smaller* norm and leaves BN statistics as sent (docs/RELIABILITY.md).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

BN_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
BN_STATISTICS = ("running_mean", "running_var")
MIN_REPLIES_FOR_MEDIAN = 3
# τ = this × the round's median update norm. With the direction bound a reversed update loses its harmful
# part, so the length bound can let honest one-class silos' long updates through (docs/RELIABILITY.md).
DEFAULT_CLIP_MULTIPLIER = 2.0
# An update may point against the round's median update down to this cosine: honest updates of one-class
# silos sometimes do, mildly (17 of 1,500 below -0.2 at α = 0.05); a reversed one is cut back to it.
OPPOSITION_COSINE = 0.2
# A silo's influence is its weight share times its update: the exponent trades the honest large silos'
# longer updates (about sqrt of their size ratio, measured) against what an attacker holding a large silo
# gains. 0.25 keeps D <= 0.5 for one attacker of six (0.5 does not): docs/RELIABILITY.md.
WEIGHT_EXPONENT = 0.25


def update_keys(template: dict[str, np.ndarray]) -> list[str]:
    """The arrays an update is measured and clipped on: floating, and not BN buffers (data statistics,
    bounded by ``clamp_bn_statistics`` instead)."""
    return [k for k, v in template.items() if v.dtype.kind == "f" and not k.endswith(BN_BUFFER_SUFFIXES)]


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys: list[str]) -> float:
    """‖a − b‖₂ in float64 over ``keys``."""
    return math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)) for k in keys))


def update_norm(reply, template: dict[str, np.ndarray], keys: list[str] | None = None) -> float:
    """‖x_k − x_t‖₂ in float64 over ``update_keys``."""
    return distance(reply.arrays, template, keys if keys is not None else update_keys(template))


def clip_bound(norms: list[float], multiplier: float) -> float | None:
    """τ: ``multiplier`` × the (lower) median norm (from 3 replies), or × the smaller norm (two-silo mode)."""
    if multiplier <= 0 or not norms:
        return None
    # With f < n/2 attackers the lower median is at most the honest norms' upper middle, however long the
    # attackers' updates are; of two norms it is the smaller one (two-silo mode).
    return multiplier * lower_median(norms)


def lower_median(values: list[float]) -> float:
    """The lower middle value (the smaller one of two)."""
    return sorted(values)[(len(values) - 1) // 2]


def weight_factors(weights: list[float]) -> list[float]:
    """max(1, w_k / median w) ** WEIGHT_EXPONENT per reply: how much wider a silo's clip bound is than τ.

    A silo with more data takes more local steps, so its honest update is longer; with one bound for all,
    the clip cuts the largest honest silos every round, re-weighting them below their size. The weights are
    the server's own (``core/weights.py``), never a claim, so no reply can widen its bound by what it says."""
    if not weights:
        return []
    reference = lower_median(weights)
    if reference <= 0:
        return [1.0] * len(weights)
    return [max(1.0, w / reference) ** WEIGHT_EXPONENT for w in weights]


def clip_updates(replies: list, template: dict[str, np.ndarray],
                 multiplier: float) -> tuple[list, list[float], float | None]:
    """(replies with each update scaled to norm <= τ_k, each reply's scale factor, τ). Off when
    ``multiplier`` is 0. τ_k = τ × ``weight_factors`` of the replies' server weights (``num_examples``).
    Only ``update_keys`` are scaled; other arrays are left as sent."""
    keys = update_keys(template)
    norms = [update_norm(reply, template, keys) for reply in replies]
    bound = clip_bound(norms, multiplier)
    if bound is None:
        return list(replies), [1.0] * len(replies), None
    factors = weight_factors([float(reply.num_examples) for reply in replies])
    clipped, scales = [], []
    for reply, norm, factor in zip(replies, norms, factors):
        own_bound = bound * factor
        scale = 1.0 if norm <= own_bound else (own_bound / norm if norm > 0 else 0.0)
        scales.append(scale)
        if scale == 1.0:
            clipped.append(reply)
            continue
        clipped.append(with_update(reply, template, {k: scale * (reply.arrays[k].astype(np.float64) - template[k])
                                                     for k in keys}))
    return clipped, scales, bound


def with_update(reply, template: dict[str, np.ndarray], updates: dict[str, np.ndarray]):
    """``reply`` whose arrays in ``updates`` are x_t + that update, in the global model's dtypes."""
    arrays = dict(reply.arrays)
    for key, update in updates.items():
        arrays[key] = (template[key].astype(np.float64) + update).astype(template[key].dtype)
    return replace(reply, arrays=arrays)


def median_update(replies: list, template: dict[str, np.ndarray], keys: list[str]) -> dict[str, np.ndarray]:
    """The coordinate-wise median of the replies' updates x_k − x_t over ``keys`` (float32, key by key)."""
    return {key: np.median(np.stack([reply.arrays[key].astype(np.float32) for reply in replies]), axis=0)
            - template[key].astype(np.float32) for key in keys}


def remove_opposition(replies: list, template: dict[str, np.ndarray]) -> tuple[list, list[float | None]]:
    """(replies whose update points against the round's median update by more than ``OPPOSITION_COSINE``
    with its component along that median raised until the cosine is −``OPPOSITION_COSINE`` (a purely
    reversed update keeps nothing along it), each update's cosine with the median where negative, else None).
    From 3 replies (a median of two is their mean, which either can move); below, unchanged. Only
    ``update_keys`` change."""
    keys = update_keys(template)
    if len(replies) < MIN_REPLIES_FOR_MEDIAN or not keys:
        return list(replies), [None] * len(replies)
    reference = median_update(replies, template, keys)
    reference_norm = math.sqrt(sum(float(np.sum(reference[k].astype(np.float64) ** 2)) for k in keys))
    if reference_norm == 0:
        return list(replies), [None] * len(replies)
    result, cosines = [], []
    for reply in replies:
        deltas = {k: reply.arrays[k].astype(np.float64) - template[k].astype(np.float64) for k in keys}
        dot = sum(float(np.sum(deltas[k] * reference[k])) for k in keys)
        norm = math.sqrt(sum(float(np.sum(d ** 2)) for d in deltas.values()))
        cosine = dot / (norm * reference_norm) if norm > 0 else 0.0
        cosines.append(cosine if cosine < 0 else None)
        if cosine >= -OPPOSITION_COSINE:
            result.append(reply)
            continue
        # along = <Δ, û>, across = |Δ − along·û|: the least along with cosine >= −c is −c/√(1−c²)·across.
        along = dot / reference_norm
        across = math.sqrt(max(norm ** 2 - along ** 2, 0.0))
        floor = -OPPOSITION_COSINE / math.sqrt(1 - OPPOSITION_COSINE ** 2) * across
        shift = (floor - along) / reference_norm  # added along the (unnormalised) median update
        result.append(with_update(reply, template, {k: deltas[k] + shift * reference[k] for k in keys}))
    return result, cosines


def clamp_bn_statistics(replies: list, template: dict[str, np.ndarray]) -> tuple[list, list[int]]:
    """(replies with every BN statistics coordinate clamped to [2nd smallest, 2nd largest] over the
    round's replies, how many coordinates each had clamped). From 3 replies; below, unchanged."""
    keys = [k for k, v in template.items() if v.dtype.kind == "f" and k.endswith(BN_STATISTICS)]
    if len(replies) < MIN_REPLIES_FOR_MEDIAN or not keys:
        return list(replies), [0] * len(replies)
    counts = [0] * len(replies)
    new_arrays = [dict(reply.arrays) for reply in replies]
    for key in keys:
        stack = np.stack([reply.arrays[key] for reply in replies])
        ordered = np.sort(stack, axis=0)
        low, high = ordered[1], ordered[-2]
        for i, value in enumerate(stack):
            bounded = np.clip(value, low, high)
            changed = int(np.count_nonzero(bounded != value))
            if changed:
                counts[i] += changed
                new_arrays[i][key] = bounded.astype(value.dtype)
    return [replace(reply, arrays=arrays) if count else reply
            for reply, arrays, count in zip(replies, new_arrays, counts)], counts
