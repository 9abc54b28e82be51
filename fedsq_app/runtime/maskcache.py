"""Cache of S's masks, bit-packed, per client and per process (run config ``mask-cache``, default auto).

Without random augmentation S and each sample's input are fixed, so a sample's masks are the same in every
epoch and round (``choose_mask_cache`` decides when that holds). The first time a sample is seen, S runs as
usual and its masks are packed to one bit per unit (one integer multiply per 8 masks); afterwards the masks
are unpacked instead of running S: one row gather per layer, one conversion and one 256-entry table lookup
for the whole batch, into preallocated buffers. Unpacked masks are 0/1 float tensors, which the fused gate
``threshold_backward(z_Q, mask, 0)`` treats exactly like S's activations (``> 0`` is "on"), so losses and
weights are bit-identical to running S (given that S's output for a sample does not depend on the rest of
its batch, which the tests check).

Memory: one bit per gated unit per sample, e.g. 68 KiB per sample for ResNet-18 at 32 px. All caches of a
process share one cap (``mask-cache-max-mb``): older clients' caches are dropped to make room, and a client
whose cache alone would not fit runs S every step (logged once).

On disk: a deployed ClientApp is a fresh process per message, so an in-memory cache would be filled and
dropped every round. The ClientApp therefore also keeps each client's masks in
``$FEDSQ_CACHE_DIR/masks/<digest>.safetensors`` (``store_path``), named by a digest of everything a mask is a
function of: S's SHA-256 and how it runs, the input pipeline's spec and code, the images' bytes, the device
type and torch's version. A change to any of them is another file, so stale masks are never read; a file
whose stored digest or shapes do not match, or that cannot be read, is ignored and rewritten. Writes are
atomic (temporary file + ``os.replace``); the folder is kept under the same ``mask-cache-max-mb``, least
recently used files first.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Hashable

import torch
from safetensors import safe_open

from safetensors.torch import save_file

from fedsq_app.core import dualcopy
from fedsq_app.core.dualcopy import DualCopy
from fedsq_app.core.wire import STRUCTURAL_SHA256
from fedsq_app.data import tensors as input_pipeline
from fedsq_app.util import cache_dir, source_digest, write_atomic

log = logging.getLogger(__name__)
FORMAT = 1
_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
# Packing 8 masks (bytes of 0/1, little-endian in one int64) into one byte in one multiply: the product puts
# byte j's bit at position 63 - j (no two partial products share a bit, so nothing carries), and the top byte
# is then the 8 masks, first one in the most significant bit. 0x8040201008040201 as a signed int64.
_GATHER = 0x8040201008040201 - 2**64
# Unpacking: byte value v -> its 8 masks (MSB first), one row per value, so one index_select (a table lookup)
# unpacks a whole batch. As 0/1 bytes viewed as one int64 (for bool masks), and as 0./1. floats for the gate:
# threshold_backward with a mask of Q's own dtype runs its vectorised kernel (with a bool mask it casts
# every element, ~2.5x slower forward + backward).
_UNPACK_BITS = (torch.arange(256).unsqueeze(1) >> _SHIFTS.long()) & 1
_UNPACK_TABLE = _UNPACK_BITS.to(torch.uint8).view(torch.int64).view(256)
_UNPACK_FLOATS = _UNPACK_BITS.float()


def _pack_rows(masks: torch.Tensor) -> torch.Tensor:
    """(B, n) bool → (B, ceil(n/8)) uint8, MSB first."""
    pad = (-masks.shape[1]) % 8
    flat = masks.view(torch.uint8)
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    words = flat.contiguous().view(len(flat), -1, 8).view(torch.int64).view(len(flat), -1)
    return words.mul(_GATHER).bitwise_right_shift_(56).bitwise_and_(255).to(torch.uint8)


def pack(masks: torch.Tensor) -> torch.Tensor:
    """(B, ...) bool/0-1 → (B, ceil(n/8)) uint8, most significant bit first (like numpy.packbits)."""
    flat = masks.reshape(len(masks), -1)
    return _pack_rows(flat if flat.dtype == torch.bool else flat != 0)


def unpack(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``pack``: (B, nbytes) uint8 → (B, *shape) bool."""
    table = _UNPACK_TABLE.to(packed.device)
    bits = table.index_select(0, packed.reshape(-1).int()).view(torch.bool).view(len(packed), -1)
    return bits[:, : shape.numel()].reshape(len(packed), *shape)


def bytes_per_sample(shapes: list[torch.Size]) -> int:
    return sum((shape.numel() + 7) // 8 for shape in shapes)


class _Lookup:
    """Preallocated buffers for one batch size: rows of packed bytes → int32 table indices → 0/1 float masks.

    The masks handed to Q live in ``out`` and are overwritten by the next lookup of this batch size. That
    is safe for training, where each step's backward runs before the next forward: Q's gate saves its mask
    for backward, and autograd refuses (an in-place modification error) to use a mask overwritten before then.
    """

    def __init__(self, batch: int, widths: list[int], shapes: list[torch.Size], device: torch.device) -> None:
        total = batch * sum(widths)
        self.table = _UNPACK_FLOATS.to(device)
        self.rows = torch.empty(total, dtype=torch.uint8, device=device)
        self.index = torch.empty(total, dtype=torch.int32, device=device)
        self.out = torch.empty(total, 8, dtype=torch.float32, device=device)
        self.row_views, self.masks, offset = [], [], 0
        for width, shape in zip(widths, shapes):
            size = batch * width
            self.row_views.append(self.rows[offset: offset + size].view(batch, width))
            bits = self.out[offset: offset + size].view(batch, width * 8)
            self.masks.append(bits.view(batch, *shape) if width * 8 == shape.numel()
                              else bits[:, : shape.numel()].view(batch, *shape))
            offset += size


class MaskCache:
    """One client's packed masks, filled lazily by sample index (an index into its ``TensorData``)."""

    def __init__(self, num_samples: int, max_bytes: int, name: str = "",
                 store: tuple[Path, str] | None = None) -> None:
        self.num_samples, self.max_bytes, self.name = num_samples, max_bytes, name
        self.store = store  # (file, digest of what the masks depend on): see store_path
        self.loaded = 0  # samples whose masks came from the store
        self._unsaved = False
        self.shapes: list[torch.Size] | None = None
        self.packed: list[torch.Tensor] = []  # per gated layer: (num_samples, ceil(units/8)) uint8
        self.filled = torch.zeros(num_samples, dtype=torch.bool)
        self.disabled_reason = ""
        self.hits = self.misses = 0
        self.make_room = lambda needed: None  # set by the registry: drop other clients' caches first
        self._lookups: dict[int, _Lookup] = {}

    @property
    def nbytes(self) -> int:
        return sum(p.numel() for p in self.packed)

    def needed_bytes(self, shapes: list[torch.Size]) -> int:
        return self.num_samples * bytes_per_sample(shapes)

    def _allocate(self, activations: list[torch.Tensor]) -> None:
        self.shapes = [a.shape[1:] for a in activations]
        needed = self.needed_bytes(self.shapes)
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

    def _lookup(self, indices: torch.Tensor) -> list[torch.Tensor]:
        rows = indices.to(self.packed[0].device)
        lookup = self._lookups.get(len(rows))
        if lookup is None:
            lookup = self._lookups[len(rows)] = _Lookup(len(rows), [p.shape[1] for p in self.packed],
                                                         self.shapes, self.packed[0].device)
        for store, row_view in zip(self.packed, lookup.row_views):
            torch.index_select(store, 0, rows, out=row_view)
        lookup.index.copy_(lookup.rows)
        torch.index_select(lookup.table, 0, lookup.index, out=lookup.out)
        return lookup.masks

    def gates(self, model: DualCopy, x: torch.Tensor, indices: torch.Tensor) -> list[torch.Tensor]:
        """Masks (cached) or S's activations (computed now and cached) for the samples ``indices`` of ``x``."""
        if not self.disabled_reason and bool(self.filled[indices].all()):
            self.hits += 1
            return self._lookup(indices)
        activations = model.structural_activations(x)
        self.misses += 1
        if self.shapes is None:
            self._allocate(activations)
        if not self.disabled_reason:
            rows = indices.to(self.packed[0].device)
            for store, activation in zip(self.packed, activations):
                store.index_copy_(0, rows, _pack_rows(activation.reshape(len(activation), -1) > 0))
            self.filled[indices] = True
            self._unsaved = True
        return activations

    def load(self, device: torch.device) -> int:
        """The masks an earlier process stored for exactly this digest; returns how many samples they cover."""
        if self.store is None or not self.store[0].is_file():
            return 0
        path, digest = self.store
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                shapes = [torch.Size(shape) for shape in json.loads(meta["shapes"])]
                if meta.get("digest") != digest or int(meta["num_samples"]) != self.num_samples:
                    return 0
                packed = [handle.get_tensor(f"layer{i}") for i in range(len(shapes))]
                filled = handle.get_tensor("filled")
        except Exception as error:  # truncated, foreign or older-format file: fill again, rewrite it
            log.warning("mask cache: ignoring %s (%s: %s)", path, type(error).__name__, error)
            return 0
        widths = [(shape.numel() + 7) // 8 for shape in shapes]
        if (filled.dtype != torch.bool or filled.shape != (self.num_samples,)
                or any(p.dtype != torch.uint8 or p.shape != (self.num_samples, w) for p, w in zip(packed, widths))):
            log.warning("mask cache: ignoring %s (unexpected tensor shapes)", path)
            return 0
        needed = self.needed_bytes(shapes)
        if needed > self.max_bytes:
            return 0  # _allocate says why at the first S pass
        self.make_room(needed)
        self.shapes, self.packed, self.filled = shapes, [p.to(device) for p in packed], filled
        os.utime(path)  # recently used: the folder's cap drops the oldest files first
        self.loaded = int(filled.sum())
        return self.loaded

    def save(self) -> None:
        """Store what this process added (a no-op without a store, new masks or room)."""
        if self.store is None or not self._unsaved or self.disabled_reason or not self.packed:
            return
        path, digest = self.store
        tensors = {f"layer{i}": p.cpu() for i, p in enumerate(self.packed)}
        tensors["filled"] = self.filled
        try:
            _trim_folder(path.parent, self.max_bytes - self.nbytes, keep=path)
            metadata = {"digest": digest, "num_samples": str(self.num_samples),
                        "shapes": json.dumps([list(s) for s in self.shapes])}
            write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
            self._unsaved = False
        except OSError as error:  # a read-only cache still trains; the next process fills again
            log.warning("mask cache: cannot write %s (%s)", path, error)


@functools.lru_cache(maxsize=1)
def mask_code_hash() -> str:
    """Digest of the code that turns an image into S's masks: DualCopy, this cache and the input pipeline."""
    return source_digest(dualcopy, sys.modules[__name__], input_pipeline)


def store_path(structural_sha256: str, spec, images: torch.Tensor, *, fold_bn: bool,
               device: torch.device) -> tuple[Path, str]:
    """(file, digest) of one client's stored masks: the digest covers everything its masks depend on."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": FORMAT, "code": mask_code_hash(), STRUCTURAL_SHA256: structural_sha256,
                              "fold-bn": fold_bn,
                              "spec": repr(spec), "device": device.type, "torch": torch.__version__,
                              "images": [list(images.shape), str(images.dtype)]}).encode())
    digest.update(images.detach().cpu().contiguous().numpy())
    text = digest.hexdigest()
    return cache_dir() / "masks" / f"{text[:32]}.safetensors", text


def _trim_folder(folder: Path, budget: int, keep: Path) -> None:
    """Delete the least recently used mask files until the others fit ``budget`` bytes. Other processes may
    read, write or trim the folder at the same time: a file gone meanwhile is simply not counted."""
    sizes = {}
    for path in folder.glob("*.safetensors"):
        try:
            stat = path.stat()
        except OSError:
            continue
        if path != keep:
            sizes[path] = (stat.st_mtime, stat.st_size)
    total = sum(size for _, size in sizes.values())
    for path in sorted(sizes, key=lambda p: sizes[p][0]):
        if total <= budget:
            break
        total -= sizes[path][1]
        path.unlink(missing_ok=True)


def choose_mask_cache(mode: str, augment: bool, gated: bool) -> tuple[bool, str]:
    """Whether a client caches S's masks (run config ``mask-cache``: auto | on | off), and why.

    auto is on exactly when the cache is exact: the same sample must give the same masks in every epoch and
    round. That holds when S is fixed (a changed S is a new cache key) and the input pipeline is
    deterministic: ``InputSpec.prepare`` is (scaling, resizing, normalising: no randomness), random
    augmentation is not. Whether the masks fit ``mask-cache-max-mb`` is decided by the cache itself once it
    knows their size (over the cap: S runs every step, and the reason is logged).
    """
    if not gated:
        return False, "this strategy has no structural copy S"
    if mode == "off":
        return False, "mask-cache='off'"
    if augment:  # config validation refuses mode 'on' with augmentation; auto turns itself off
        return False, "auto: augment=true changes every image each epoch, so its masks too"
    if mode == "on":
        return True, "mask-cache='on'"
    return True, "auto: no augmentation and deterministic preprocessing, so each sample's masks never change"


def forward(model, x: torch.Tensor, indices: torch.Tensor, cache: MaskCache | None) -> torch.Tensor:
    """``model(x)``, with S's masks from ``cache`` when there is one (and ``model`` is a DualCopy)."""
    if cache is None or not isinstance(model, DualCopy) or cache.disabled_reason:
        return model(x)
    return model(x, gates=cache.gates(model, x, indices))


class CacheRegistry:
    """All mask caches of one process under one memory cap; the least recently used client goes first."""

    def __init__(self) -> None:
        self.caches: OrderedDict[Hashable, MaskCache] = OrderedDict()

    def get(self, key: Hashable, num_samples: int, max_mb: float,
            store: Callable[[], tuple[Path, str]] | None = None, device: torch.device | None = None) -> MaskCache:
        """``store``: called once, when this process first sees ``key``, for the file of its stored masks."""
        max_bytes = int(max_mb * 2**20)
        cache = self.caches.get(key)
        if cache is None or cache.num_samples != num_samples or cache.max_bytes != max_bytes:
            cache = MaskCache(num_samples, max_bytes, name=str(key)[:80], store=store() if store else None)
            cache.make_room = lambda needed: self._evict(max_bytes, keep=key, reserve=needed)
            cache.load(device or torch.device("cpu"))
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


def client_cache(key: Hashable, num_samples: int, max_mb: float,
                 store: Callable[[], tuple[Path, str]] | None = None, device: torch.device | None = None) -> MaskCache:
    """This process's cache for one client's data (``key`` must pin S, the data and the input spec), loaded
    from ``store()`` (see ``store_path``) when this process first sees the client."""
    return REGISTRY.get(key, num_samples, max_mb, store, device)
