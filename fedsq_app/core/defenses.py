"""Influence bounds, applied to the replies that passed validation (``fedsq_app.core.replies``).

Rejecting outliers alone lets an attacker choose any update just inside the bound, in any direction.
Here every update's influence is bounded instead, whatever its direction:

- **Influence bound** (from 3 replies): a silo's pull on the weighted mean is its weight share times its
  update's distance from the round's coordinate-wise median update c (Yin et al. 2018: a minority cannot
  move a coordinate's median out of the honest range). Each pull, w_k / W × ‖Δ_k − c‖, is scaled to at
  most β × the round's median ‖Δ‖ (β = ``influence-bound``): Δ_k ← c + s_k (Δ_k − c), centred clipping
  (Karimireddy et al. 2021) per unit of weight. If no honest update is bounded, the mean is
  h + Σ_hostile w_k / W (c + s_k (Δ_k − c) − h) with h the honest mean: f hostile silos move it by at most
  f β × the median norm plus their weight share × ‖c − h‖, in any direction, however much data they hold.
  An honest update whose pull is within β is used bit for bit as sent.
- **Norm clipping** (Sun et al. 2019, "Can you really backdoor FL?"): the bound of rounds with fewer than
  3 replies (two-silo mode, where no median exists), and of every round when the influence bound is off.
  Each update Δ_k = x_k − x_t is scaled to at most τ_k = τ · max(1, w_k / median w)^¼, τ =
  ``clip-multiplier`` × the round's lower median ‖Δ‖ (of two replies, the smaller).
- **BN running statistics clamp**: each coordinate of each reply's ``running_mean`` / ``running_var`` is
  clamped into the range the other replies span (the 2nd smallest to the 2nd largest value), so one silo
  cannot move them beyond the honest spread.

Updates are measured on the trainable parameters (``update_keys``); the weights w_k are the server's own
(``core/weights.py``), never a claim. Pure functions of checked replies (objects with ``arrays`` and
``num_examples``) and the global model's arrays (docs/RELIABILITY.md, "Trust model").
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

BN_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
BN_STATISTICS = ("running_mean", "running_var")
MIN_REPLIES_FOR_MEDIAN = 3
# τ = this × the round's median update norm: the length bound of two-silo rounds (docs/RELIABILITY.md).
DEFAULT_CLIP_MULTIPLIER = 2.0
# β of the influence bound (off by default): a silo may pull the round's mean at most this × the round's
# median update norm away from the median update. It caps every silo's influence at the same amount, so it
# cuts large honest silos under label skew every round (measured: docs/RELIABILITY.md); 0.3 bounds two
# hostile silos of six holding 47 % of the data to D <= 1.0.
DEFAULT_INFLUENCE_BOUND = 0.0
# β of the deviation bound: an update may lie at most this × the round's median distance from the median
# update (× the silo's size factor) away from it. In one 20-silo α = 0.05 federation (seed 2, 15 rounds) honest
# updates reached 3.4 × that distance at most; over 10 seeds 16 of 3,000 went past 3 (docs/RELIABILITY.md).
DEFAULT_DEVIATION_BOUND = 3.0
# τ of the direction check: a node whose update's cosine with the round's median update is below −τ two replies
# running is rejected. Honest one-class silos (α = 0.05) sent −0.12 to −0.46 now and then, the colluders of
# min-max and IPM −0.58 to −0.91 most rounds; at 0.2 it rejected 1.5 to 2.5 % of honest replies at no measured
# cost in accuracy (docs/RELIABILITY.md).
DEFAULT_DIRECTION_CHECK = 0.2
# The norm clip widens with a silo's weight: the exponent trades the honest large silos' longer updates
# (about sqrt of their size ratio, measured) against what an attacker holding a large silo gains.
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


def clip_bound(norms: list[float], multiplier: float, floor: float = 0.0) -> float | None:
    """τ: ``multiplier`` × the (lower) median norm (from 3 replies), or × the smaller norm (two-silo mode),
    never below ``multiplier`` × ``floor`` (the server's record of earlier rounds: ``norm_floor``)."""
    if multiplier <= 0 or not norms:
        return None
    # With f < n/2 attackers the lower median is at most the honest norms' upper middle, however long the
    # attackers' updates are; of two norms it is the smaller one (two-silo mode). Short or empty hostile
    # updates can drag it down; the floor from earlier rounds keeps it.
    return multiplier * max(lower_median(norms), floor)


# The round's reference norm is at least this × the median of the last ``NORM_HISTORY`` rounds' (lower)
# median update norms: replies of length 0 cannot shrink the bound to nothing. Honest norms shrink
# slowly as training converges, far less than half from one round to the next few.
NORM_FLOOR = 0.5
NORM_HISTORY = 5


def norm_floor(history: list[float]) -> float:
    """``NORM_FLOOR`` × the median of the last ``NORM_HISTORY`` reference norms (0 with no history)."""
    recent = sorted(history[-NORM_HISTORY:])
    return NORM_FLOOR * recent[len(recent) // 2] if recent else 0.0


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
                 multiplier: float, floor: float = 0.0) -> tuple[list, list[float], float | None]:
    """(replies with each update scaled to norm <= τ_k, each reply's scale factor, τ). Off when
    ``multiplier`` is 0. τ_k = τ × ``weight_factors`` of the replies' server weights (``num_examples``).
    Only ``update_keys`` are scaled; other arrays are left as sent."""
    keys = update_keys(template)
    norms = [update_norm(reply, template, keys) for reply in replies]
    bound = clip_bound(norms, multiplier, floor)
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


# Coordinates per slice of the median: its working memory is replies x 8 MiB, not replies x the model in float64
# (AlexNet's largest array, 20 replies: about 0.3 GB with the sort's copy, instead of about 12 GB).
MEDIAN_SLICE = 1 << 20


def median_update(replies: list, template: dict[str, np.ndarray], keys: list[str]) -> dict[str, np.ndarray]:
    """The coordinate-wise median of the replies' updates x_k − x_t over ``keys`` (float64, key by key, a slice
    of coordinates at a time: the same values, as each coordinate's median is its own)."""
    center = {}
    for key in keys:
        flat = [reply.arrays[key].reshape(-1) for reply in replies]
        median = np.empty(flat[0].size, np.float64)
        for start in range(0, median.size, MEDIAN_SLICE):
            part = np.stack([values[start:start + MEDIAN_SLICE] for values in flat]).astype(np.float64)
            median[start:start + MEDIAN_SLICE] = np.median(part, axis=0)
        center[key] = median.reshape(np.shape(template[key])) - template[key].astype(np.float64)
    return center


def bound_influence(replies: list, template: dict[str, np.ndarray],
                    bound: float, floor: float = 0.0) -> tuple[list, list[float], float | None]:
    """(replies whose pull w_k / W × ‖Δ_k − c‖ is scaled to at most the round's limit, each reply's scale
    of Δ_k − c, the limit: ``bound`` × the lower median ‖Δ‖), c the coordinate-wise median update and w the
    server's weights (``num_examples``). From 3 replies; below, or with ``bound`` 0: unchanged, limit None.
    Only ``update_keys`` change; a reply within the limit is returned as sent."""
    keys = update_keys(template)
    if bound <= 0 or len(replies) < MIN_REPLIES_FOR_MEDIAN or not keys:
        return list(replies), [1.0] * len(replies), None
    total = float(sum(reply.num_examples for reply in replies))
    if total <= 0:  # no weight to share: nothing to bound (the server's policies give positive weights)
        return list(replies), [1.0] * len(replies), None
    limit = bound * max(lower_median([update_norm(reply, template, keys) for reply in replies]), floor)
    center = median_update(replies, template, keys)
    result, scales = [], []
    for reply in replies:
        deviation = {k: reply.arrays[k].astype(np.float64) - template[k] - center[k] for k in keys}
        pull = reply.num_examples / total * math.sqrt(sum(float(np.sum(d ** 2)) for d in deviation.values()))
        scale = 1.0 if pull <= limit else limit / pull
        scales.append(scale)
        result.append(reply if scale == 1.0 else
                      with_update(reply, template, {k: center[k] + scale * deviation[k] for k in keys}))
    return result, scales, limit


# How much wider a larger silo's deviation allowance is: × (w_k / median w) ** this. A silo with more data
# takes more local steps, so its honest update, and its distance from the median one, is longer.
SIZE_EXPONENT = 0.5


def deviations(replies: list, template: dict[str, np.ndarray], keys: list[str],
               center: dict[str, np.ndarray] | None = None) -> tuple[dict, list[float]]:
    """(c, ‖Δ_k − c‖ per reply): the coordinate-wise median update (``center`` when the caller has it for
    these very replies) and each update's distance from it."""
    center = median_update(replies, template, keys) if center is None else center
    return center, [math.sqrt(sum(float(np.sum((reply.arrays[k].astype(np.float64) - template[k] - center[k]) ** 2))
                                  for k in keys)) for reply in replies]


def bound_deviation(replies: list, template: dict[str, np.ndarray], bound: float, floor: float = 0.0,
                    measured: tuple[dict, list[float]] | None = None) -> tuple[list, list[float], float | None]:
    """(replies whose deviation ‖Δ_k − c‖ from the median update c is scaled to at most their allowance,
    each reply's scale of Δ_k − c, the round's median deviation). The allowance is ``bound`` × the round's
    (lower) median deviation (at least ``floor``) × max(1, w_k / median w) ** ``SIZE_EXPONENT``: a bound
    set by the round's own spread, not by a silo's weight share, so a large honest silo is not cut for
    being large. From 3 replies; below, or with ``bound`` 0: unchanged, None. ``measured``: these replies'
    ``deviations``, when the caller has them."""
    keys = update_keys(template)
    if bound <= 0 or len(replies) < MIN_REPLIES_FOR_MEDIAN or not keys:
        return list(replies), [1.0] * len(replies), None
    center, devs = measured or deviations(replies, template, keys)
    typical = max(lower_median(devs), floor)
    weights = [float(reply.num_examples) for reply in replies]
    reference = lower_median(weights)
    result, scales = [], []
    for reply, dev, weight in zip(replies, devs, weights):
        allowance = bound * typical * (max(1.0, weight / reference) ** SIZE_EXPONENT if reference > 0 else 1.0)
        scale = 1.0 if dev <= allowance else allowance / dev
        scales.append(scale)
        result.append(reply if scale == 1.0 else with_update(
            reply, template, {k: center[k] + scale * (reply.arrays[k].astype(np.float64) - template[k] - center[k])
                              for k in keys}))
    return result, scales, typical


def alignments(replies: list, template: dict[str, np.ndarray], keys: list[str],
               center: dict[str, np.ndarray], norms: list[float] | None = None) -> list[float]:
    """cos(Δ_k, c) per reply, c the round's median update: below 0, the update points against what the
    round's replies agree on (0 where either has length 0). ``norms``: the replies' ``update_norm``s, when
    the caller has them."""
    center_norm = math.sqrt(sum(float(np.sum(center[k] ** 2)) for k in keys))
    result = []
    for reply, norm in zip(replies, norms or [update_norm(reply, template, keys) for reply in replies]):
        dot = sum(float(np.sum((reply.arrays[k].astype(np.float64) - template[k]) * center[k])) for k in keys)
        result.append(dot / (norm * center_norm) if norm > 0 and center_norm > 0 else 0.0)
    return result


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
