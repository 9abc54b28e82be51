"""The default defenses, applied to the replies that passed validation (``fedsq_app.core.replies``).

On by default, and tuned so that an honest federation never trips them (docs/RELIABILITY.md): a robust
distance guard (median + MAD of the round's update distances) and a clip of each node's aggregation weight
to a multiple of the round's median ``num-examples``. Pure functions of checked replies (objects with
``arrays`` and ``num_examples``) and the global model's arrays.
"""

from __future__ import annotations

import math

import numpy as np

# The distance guard's robust z: median + MAD_Z x 1.4826 x MAD is ~6 standard deviations for normal data.
MAD_Z = 6.0
MAD_TO_SIGMA = 1.4826


def update_distance(reply, template: dict[str, np.ndarray]) -> float:
    """L2 distance (float64, over every floating array) between a reply and the current global model."""
    total = 0.0
    for key, current in template.items():
        if current.dtype.kind == "f":
            total += float(np.sum((reply.arrays[key].astype(np.float64) - current.astype(np.float64)) ** 2))
    return math.sqrt(total)


def distance_outliers(replies: list, template: dict[str, np.ndarray],
                      max_ratio: float, weights: list[int] | None = None) -> list[tuple[int, str]]:
    """(index in ``replies``, reason) of each update too far from the global model to be honest.

    Far means beyond both ``max_ratio`` x the round's median distance and median + ``MAD_Z`` robust
    standard deviations (1.4826 x the median absolute deviation). The second term widens the bound when
    honest updates are spread out, so honest rounds do not trip it; the first keeps a floor when they are
    all alike (MAD near 0). A node with more data takes more local steps and moves further: with
    ``weights`` (the clipped num-examples claims) a node's bound grows by sqrt(its weight / the median
    weight) when above 1, so a large silo is not mistaken for an attacker (the clip caps that allowance).
    Off when ``max_ratio`` is 0, with fewer than 3 replies (a median of two is their mean: it cannot tell
    which one is the outlier) or when the median is 0 (nothing moved, no scale to compare with).
    """
    if max_ratio <= 0 or len(replies) < 3:
        return []
    distances = np.array([update_distance(reply, template) for reply in replies])
    median = float(np.median(distances))
    if median <= 0:
        return []
    mad = float(np.median(np.abs(distances - median)))
    bound = max(max_ratio * median, median + MAD_Z * MAD_TO_SIGMA * mad)
    weights = weights or [1] * len(replies)
    median_weight = float(np.median(weights))
    outliers = []
    for i, (d, weight) in enumerate(zip(distances, weights)):
        allowance = math.sqrt(max(1.0, weight / median_weight))
        if d > bound * allowance:
            outliers.append((i, f"update L2 distance {d:.4g} > {bound * allowance:.4g} (the round's median "
                                f"{median:.4g}; bound = max({max_ratio:g} x median, median + {MAD_Z:g} x 1.4826 x "
                                f"MAD {mad:.4g}) x sqrt(weight share) {allowance:.3g})"))
    return outliers


def clipped_weights(claims: list[int], max_ratio: float) -> list[int]:
    """Each claimed ``num-examples`` clipped to ``max_ratio`` x the round's median claim (from 3 replies on).

    Why a clip and not a weight fixed at a node's first claim: a first claim can already be a lie, and a
    silo that reconnects gets a new node id; the clip bounds every node's share in every round. A large
    honest node is never rejected, only weighted as ``max_ratio`` median nodes at most.
    """
    if max_ratio <= 0 or len(claims) < 3:
        return list(claims)
    cap = max(1, math.floor(max_ratio * float(np.median(claims))))
    return [min(claim, cap) for claim in claims]
