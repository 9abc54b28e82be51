"""Opt-in cache of S's masks, bit-packed, per client and per process (run config ``mask-cache``).

S and the inputs are fixed (no random augmentation in ``train_local``), so a sample's masks are the same in
every epoch and round. The first time a sample is seen, S runs as usual and its masks are packed to one
bit per unit; afterwards the masks are unpacked instead of running S. Unpacked masks are bool tensors,
which the fused gate ``threshold_backward(z_Q, mask, 0)`` treats exactly like S's activations (``> 0`` is
"on"), so losses and weights are bit-identical to running S (given that S's output for a sample does not
depend on the rest of its batch, which the tests check).

Memory: one bit per gated unit per sample, e.g. 68 KiB per sample for ResNet-18 at 32 px. All caches of a
process share one cap (``mask-cache-max-mb``): older clients' caches are dropped to make room, and a client
whose cache alone would not fit runs S every step (logged once).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Hashable

import torch

from fedsq_app.dualcopy import DualCopy

log = logging.getLogger(__name__)
_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


def pack(masks: torch.Tensor) -> torch.Tensor:
    """(B, ...) bool/0-1 → (B, ceil(n/8)) uint8, most significant bit first (like numpy.packbits)."""
    flat = masks.reshape(len(masks), -1).to(torch.uint8)
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    bits = flat.view(len(flat), -1, 8) << _SHIFTS.to(flat.device)
    return bits.sum(dim=-1, dtype=torch.uint8)  # disjoint bits: the sum is the bitwise or


def unpack(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``pack``: (B, nbytes) uint8 → (B, *shape) bool."""
    bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    numel = shape.numel()
    flat = bits.view(len(packed), -1)
    if flat.shape[1] != numel:
        flat = flat[:, :numel]
    return flat.reshape(len(packed), *shape).view(torch.bool)


def bytes_per_sample(shapes: list[torch.Size]) -> int:
    return sum((shape.numel() + 7) // 8 for shape in shapes)


class MaskCache:
    """One client's packed masks, filled lazily by sample index (an index into its ``TensorData``)."""

    def __init__(self, num_samples: int, max_bytes: int, name: str = "") -> None:
        self.num_samples, self.max_bytes, self.name = num_samples, max_bytes, name
        self.shapes: list[torch.Size] | None = None
        self.packed: list[torch.Tensor] = []
        self.filled = torch.zeros(num_samples, dtype=torch.bool)
        self.disabled_reason = ""
        self.hits = self.misses = 0
        self.make_room = lambda needed: None  # set by the registry: drop other clients' caches first

    @property
    def nbytes(self) -> int:
        return sum(p.numel() for p in self.packed)

    def _allocate(self, activations: list[torch.Tensor]) -> None:
        self.shapes = [a.shape[1:] for a in activations]
        needed = self.num_samples * bytes_per_sample(self.shapes)
        if needed > self.max_bytes:
            self.disabled_reason = (
                f"mask cache{' ' + self.name if self.name else ''} needs {needed / 2**20:.1f} MiB "
                f"({bytes_per_sample(self.shapes) / 1024:.1f} KiB/sample x {self.num_samples} samples) but "
                f"mask-cache-max-mb allows {self.max_bytes / 2**20:.1f} MiB: computing S every step instead")
            log.warning(self.disabled_reason)
            return
        self.make_room(needed)
        # On S's device: a lookup then needs no host round trip.
        device = activations[0].device
        self.packed = [torch.zeros(self.num_samples, (s.numel() + 7) // 8, dtype=torch.uint8, device=device)
                       for s in self.shapes]

    def gates(self, model: DualCopy, x: torch.Tensor, indices: torch.Tensor) -> list[torch.Tensor]:
        """Masks (cached) or S's activations (computed now and cached) for the samples ``indices`` of ``x``."""
        if not self.disabled_reason and bool(self.filled[indices].all()):
            self.hits += 1
            rows = indices.to(self.packed[0].device)
            return [unpack(p.index_select(0, rows), s) for p, s in zip(self.packed, self.shapes)]
        activations = model.structural_activations(x)
        self.misses += 1
        if self.shapes is None:
            self._allocate(activations)
        if not self.disabled_reason:
            rows = indices.to(self.packed[0].device)
            for store, activation in zip(self.packed, activations):
                store.index_copy_(0, rows, pack(activation > 0))
            self.filled[indices] = True
        return activations


def forward(model, x: torch.Tensor, indices: torch.Tensor, cache: MaskCache | None) -> torch.Tensor:
    """``model(x)``, with S's masks from ``cache`` when there is one (and ``model`` is a DualCopy)."""
    if cache is None or not isinstance(model, DualCopy) or cache.disabled_reason:
        return model(x)
    return model(x, gates=cache.gates(model, x, indices))


class CacheRegistry:
    """All mask caches of one process under one memory cap; the least recently used client goes first."""

    def __init__(self) -> None:
        self.caches: OrderedDict[Hashable, MaskCache] = OrderedDict()

    def get(self, key: Hashable, num_samples: int, max_mb: float) -> MaskCache:
        max_bytes = int(max_mb * 2**20)
        cache = self.caches.get(key)
        if cache is None or cache.num_samples != num_samples or cache.max_bytes != max_bytes:
            cache = MaskCache(num_samples, max_bytes, name=str(key)[:80])
            cache.make_room = lambda needed: self._evict(max_bytes, keep=key, reserve=needed)
        self.caches[key] = cache
        self.caches.move_to_end(key)
        return cache

    def _evict(self, max_bytes: int, keep: Hashable, reserve: int) -> None:
        while len(self.caches) > 1 and self.total_bytes(exclude=keep) + reserve > max_bytes:
            oldest = next(k for k in self.caches if k != keep)
            log.info("mask cache: dropping %s's masks to stay under %.0f MiB", str(oldest)[:80], max_bytes / 2**20)
            del self.caches[oldest]

    def total_bytes(self, exclude: Hashable = None) -> int:
        return sum(c.nbytes for k, c in self.caches.items() if k != exclude)


REGISTRY = CacheRegistry()


def client_cache(key: Hashable, num_samples: int, max_mb: float) -> MaskCache:
    """This process's cache for one client's data (``key`` must pin S, the data and the input spec)."""
    return REGISTRY.get(key, num_samples, max_mb)
