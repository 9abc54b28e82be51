"""The attacks ``fedsq-defenses attacks`` runs (``fedsq_app.tools.defenses``): each rewrites the hostile
replies of one round, knowing the honest ones (an omniscient attacker, the worst case the bounds must hold
against). The threats are those of docs/RELIABILITY.md's trust model."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from flwr.app import Array, Message

from fedsq_app.config import RunConfig
from fedsq_app.core import wire
from fedsq_app.core.defenses import distance, update_keys
from fedsq_app.core.packing import PREFIX, decode_arrays, pack


def message_arrays(message: Message, template: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A message's travelling arrays (packed on the wire, ``core/packing.py``), by key."""
    values = decode_arrays(message.content[wire.ARRAYS], template)
    if isinstance(values, str):
        raise ValueError(values)
    return values


def _set(reply: Message, arrays: dict[str, np.ndarray], template: dict[str, np.ndarray]) -> None:
    reply.content[wire.ARRAYS] = pack({**message_arrays(reply, template), **arrays})


def _honest_mean_update(honest: list[dict], start: dict, keys: list[str]) -> dict:
    return {k: np.mean([h[k].astype(np.float64) - start[k] for h in honest], axis=0) for k in keys}


# An attack rewrites the hostile replies of one round. (start arrays, hostile replies, honest arrays) -> None.
Attack = Callable[[dict, list[Message], list[dict]], None]


def boosted(factor: float) -> Attack:
    """Each hostile node sends start + factor x (its own trained update), on the parameters."""
    def attack(start, hostile, honest):
        for reply in hostile:
            trained = message_arrays(reply, start)
            _set(reply, {k: (start[k] + factor * (trained[k] - start[k])).astype(trained[k].dtype)
                         for k in update_keys(start)}, start)
    return attack


def against_honest(length: float | None, factor: float | None = None) -> Attack:
    """Omniscient: start − (the honest mean update) scaled to ``length`` x the median honest norm (or by
    ``factor``): the direction that undoes the honest step, at a length the attacker chooses."""
    def attack(start, hostile, honest):
        keys = update_keys(start)
        mean = _honest_mean_update(honest, start, keys)
        norms = [distance(h, start, keys) for h in honest]
        mean_norm = math.sqrt(sum(float(np.sum(v ** 2)) for v in mean.values())) or 1.0
        scale = factor if factor is not None else length * float(np.median(norms)) / mean_norm
        for reply in hostile:
            _set(reply, {k: (start[k] - scale * mean[k]).astype(start[k].dtype) for k in keys}, start)
    return attack


def across_honest(length: float) -> Attack:
    """Omniscient: start + a random direction orthogonal to the honest mean update, at ``length`` x the
    median honest norm: a direction no reference update can tell from an honest one."""
    def attack(start, hostile, honest):
        keys = update_keys(start)
        mean = _honest_mean_update(honest, start, keys)
        rng = np.random.default_rng(len(hostile))
        noise = {k: rng.standard_normal(mean[k].shape) for k in keys}
        along = sum(float(np.sum(noise[k] * mean[k])) for k in keys) / max(
            sum(float(np.sum(mean[k] ** 2)) for k in keys), 1e-30)
        across = {k: noise[k] - along * mean[k] for k in keys}
        scale = length * float(np.median([distance(h, start, keys) for h in honest])) / math.sqrt(
            sum(float(np.sum(v ** 2)) for v in across.values()))
        for reply in hostile:
            _set(reply, {k: (start[k] + scale * across[k]).astype(start[k].dtype) for k in keys}, start)
    return attack


def inflated_claim(start, hostile, honest):
    """Honest arrays, num-examples claimed as 10^9."""
    for reply in hostile:
        reply.content[wire.METRICS][wire.NUM_EXAMPLES] = 10**9


def bn_shift(start, hostile, honest):
    """Every BN running_mean moved by 1.2 running standard deviations (inside every magnitude bound)."""
    for reply in hostile:
        arrays = message_arrays(reply, start)
        _set(reply, {k: (v + np.float32(1.2) * np.sqrt(arrays[k.replace("running_mean", "running_var")]))
                     .astype(v.dtype) for k, v in arrays.items() if k.endswith("running_mean")}, start)


def forged(start, hostile, honest):
    """Arrays whose bytes are not what their metadata declares, a complex payload, and metrics at ±1e308."""
    for i, reply in enumerate(hostile):
        record = reply.content[wire.ARRAYS]
        key = PREFIX + "float32"  # the packed floating parameters
        declared = record[key]
        payload = Array(np.zeros(3, np.float32)) if i % 2 == 0 else Array(np.full(declared.shape, 1 + 1j))
        record[key] = Array(dtype=declared.dtype, shape=tuple(declared.shape), stype=payload.stype,
                            data=payload.data)
        reply.content[wire.METRICS][wire.TRAIN_LOSS] = 1e308 if i % 2 == 0 else -1e308


def _stack(honest: list[dict], start: dict, keys: list[str]) -> np.ndarray:
    """The honest updates as rows of one float64 matrix (keys concatenated in order)."""
    return np.stack([np.concatenate([(h[k].astype(np.float64) - start[k]).ravel() for k in keys]) for h in honest])


def _send(hostile: list[Message], start: dict, keys: list[str], update: np.ndarray) -> None:
    """Every hostile reply sends start + ``update`` (a flat vector over ``keys``) on those keys."""
    arrays, offset = {}, 0
    for k in keys:
        size = start[k].size
        arrays[k] = (start[k] + update[offset:offset + size].reshape(start[k].shape)).astype(start[k].dtype)
        offset += size
    for reply in hostile:
        _set(reply, arrays, start)


def alie(z: float = 1.0) -> Attack:
    """"A little is enough" (Baruch et al. 2019): μ − z·σ per coordinate of the honest updates. The paper's z
    for small federations is below 1 (six nodes, one hostile: 0); z = 1 is the usual benchmark setting."""
    def attack(start, hostile, honest):
        keys = update_keys(start)
        rows = _stack(honest, start, keys)
        _send(hostile, start, keys, rows.mean(axis=0) - z * rows.std(axis=0))
    return attack


def ipm(epsilon: float) -> Attack:
    """Inner-product manipulation (Xie et al. 2020): −ε × the honest mean update. Small ε stays close to the
    honest cloud; large ε reverses the step."""
    def attack(start, hostile, honest):
        keys = update_keys(start)
        _send(hostile, start, keys, -epsilon * _stack(honest, start, keys).mean(axis=0))
    return attack


def _largest_gamma(fits, high: float = 100.0, steps: int = 40) -> float:
    """The largest γ in [0, high] with ``fits(γ)`` (bisection; fits(0) assumed)."""
    low = 0.0
    if fits(high):
        return high
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def min_max_or_sum(kind: str) -> Attack:
    """Shejwalkar & Houmansadr (NDSS 2021): μ + γ·p with p = −μ/‖μ‖, γ the largest such that the hostile
    update's largest ('min-max') or summed squared ('min-sum') distance to the honest updates stays within
    the honest updates' own largest such figure."""
    def attack(start, hostile, honest):
        keys = update_keys(start)
        rows = _stack(honest, start, keys)
        mean = rows.mean(axis=0)
        direction = -mean / max(float(np.linalg.norm(mean)), 1e-30)
        pairwise = np.linalg.norm(rows[:, None, :] - rows[None, :, :], axis=2)
        if kind == "min-max":
            limit = float(pairwise.max())
            fits = lambda g: float(np.linalg.norm(rows - (mean + g * direction), axis=1).max()) <= limit  # noqa: E731
        else:
            limit = float((pairwise ** 2).sum(axis=1).max())
            fits = lambda g: float((np.linalg.norm(rows - (mean + g * direction), axis=1) ** 2).sum()) <= limit  # noqa: E731
        _send(hostile, start, keys, mean + _largest_gamma(fits) * direction)
    return attack


def fixed_target(raise_by: float = 5.0, length: float = 100.0) -> Attack:
    """The adaptive attacker: every round, an update towards one fixed bad model (the head's bias of class 0
    raised by ``raise_by``), ``length`` × the median honest norm long, so that whatever bound the server
    applies places it exactly at the bound, round after round."""
    def attack(start, hostile, honest):
        keys = update_keys(start)
        bias = [k for k in keys if start[k].ndim == 1][-1]  # the head's bias: the last 1-d parameter
        target = np.concatenate([np.zeros(start[k].size) if k != bias else
                                 np.eye(1, start[k].size).ravel() * raise_by for k in keys])
        scale = length * float(np.median(np.linalg.norm(_stack(honest, start, keys), axis=1)))
        _send(hostile, start, keys, target / max(float(np.linalg.norm(target)), 1e-30) * scale)
    return attack


UNDER_BOUND = RunConfig().clip_multiplier - 0.1  # just inside the norm clip (two-silo rounds, or bound off)
# name -> (attack, hostile node count, nodes in the federation: None = --clients, honest replies dropped)
ATTACKS: dict[str, tuple[Attack, int, int | None, int]] = {
    "inflated num-examples (1 of 6)": (inflated_claim, 1, None, 0),
    "boosted x30 (1 of 6)": (boosted(30.0), 1, None, 0),
    "reversed at 1x honest norm (1 of 6)": (against_honest(1.0), 1, None, 0),
    f"reversed at {UNDER_BOUND}x honest norm (1 of 6)": (against_honest(UNDER_BOUND), 1, None, 0),
    f"orthogonal at {UNDER_BOUND}x honest norm (1 of 6)": (across_honest(UNDER_BOUND), 1, None, 0),
    "reversed x30, Sybils (2 of 6)": (against_honest(None, 30.0), 2, None, 0),
    "BN running_mean +1.2 sd (1 of 6)": (bn_shift, 1, None, 0),
    "forged arrays and metrics (1 of 6)": (forged, 1, None, 0),
    "boosted x1240, two-reply rounds (1 of 3, one honest lost)": (boosted(1240.0), 1, 3, 1),
}
# The field's benchmark attacks (docs/RELIABILITY.md), by one and by two colluders of six.
for _count in (1, 2):
    ATTACKS.update({
        f"ALIE z=1 ({_count} of 6)": (alie(1.0), _count, None, 0),
        f"IPM eps=0.1 ({_count} of 6)": (ipm(0.1), _count, None, 0),
        f"IPM eps=10 ({_count} of 6)": (ipm(10.0), _count, None, 0),
        f"min-max ({_count} of 6)": (min_max_or_sum("min-max"), _count, None, 0),
        f"min-sum ({_count} of 6)": (min_max_or_sum("min-sum"), _count, None, 0),
        f"fixed target at the bound ({_count} of 6)": (fixed_target(), _count, None, 0),
    })


ABSENT: dict[str, int] = {}  # scenario name -> how many of the first nodes' replies are dropped


def without(hostile: int) -> str:
    """The scenario of the federation without its ``hostile`` attackers (their replies dropped)."""
    name = f"without the {hostile} attacker(s) (their replies dropped)"
    ABSENT[name] = hostile
    return name


def nan_reply(start, hostile, honest):
    """A local run that diverged: one NaN in the first floating array of the reply."""
    for reply in hostile:
        arrays = message_arrays(reply, start)
        key = next(k for k, v in arrays.items() if v.dtype.kind == "f")
        broken = arrays[key].copy()
        broken.flat[0] = np.nan
        _set(reply, {key: broken}, start)


def claims(metric: str, value: int) -> Attack:
    """A node whose replies name ``metric`` = ``value`` (a misconfiguration, or a lie)."""
    def attack(start, hostile, honest):
        for reply in hostile:
            reply.content[wire.METRICS][metric] = value
    return attack


# case -> (what the first node does to its train replies, nodes, run-config keys of the federation without it)
LIVENESS: dict[str, tuple[Attack, int, dict]] = {
    "one of 3 replies NaN every round": (nan_reply, 3, {"min-valid-replies": 2}),
    "one of 6 names 7 partitions": (claims(wire.NUM_PARTITIONS, 7), 6, {}),
    "one of 6 names partition 2 (another node's)": (claims(wire.PARTITION_ID, 2), 6, {}),
}
