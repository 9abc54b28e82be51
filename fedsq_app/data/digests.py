"""Content digests of images: what a backbone was pretrained on, compared with what a node holds.

Each image is reduced to a 64-bit BLAKE2b digest of its decoded bytes (uint8, C×H×W, with the shape in
the key), so the same picture matches whether it came as IDX, PNG or parquet. A backbone's sidecar keeps
the sorted digests of all its pretraining images (``pretrain_images``: about 8 bytes per image, base64 in
the JSON sidecar, no pickle); a node intersects them with the digests of its own data. 64-bit digests of a
few thousand images collide by chance with probability ~n²/2⁶⁵, i.e. never in practice.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from pathlib import Path

import numpy as np

ALGORITHM = "blake2b-64 of the decoded uint8 image (C x H x W bytes, shape in the key)"
FIELD = "pretrain_images"  # the sidecar entry


def image_digests(images) -> np.ndarray:
    """One uint64 digest per image of a uint8 (N, C, H, W) array or tensor, in input order."""
    array = np.ascontiguousarray(np.asarray(images), dtype=np.uint8)
    if array.ndim < 2:
        raise ValueError(f"expected a batch of images, got an array of shape {array.shape}")
    key = ("x".join(str(d) for d in array.shape[1:])).encode()  # same bytes, other shape: another image
    rows = array.reshape(len(array), -1)
    out = np.empty(len(array), dtype=np.uint64)
    for index, row in enumerate(rows):
        out[index] = int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8, key=key).digest(), "little")
    return out


def sidecar_entry(images) -> dict:
    """The sidecar's ``pretrain_images`` entry for these pretraining images (sorted, unique digests)."""
    digests = np.unique(image_digests(images))  # np.unique sorts
    return {"algorithm": ALGORITHM, "count": int(len(images)), "unique": int(len(digests)),
            "sorted_u64_le_base64": base64.b64encode(digests.astype("<u8").tobytes()).decode("ascii")}


def parse_entry(entry: dict) -> np.ndarray:
    """The sorted uint64 digests of a sidecar entry; ``ValueError`` for an entry of another kind."""
    if not isinstance(entry, dict) or entry.get("algorithm") != ALGORITHM:
        raise ValueError(f"unknown digest entry (algorithm {entry.get('algorithm') if isinstance(entry, dict) else entry!r})")
    raw = base64.b64decode(entry["sorted_u64_le_base64"], validate=True)
    digests = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
    if np.any(digests[1:] <= digests[:-1]):
        raise ValueError("digests are not sorted and unique")
    return digests


@functools.lru_cache(maxsize=4)
def _sidecar_digests(path: str, mtime_ns: int, size: int) -> np.ndarray | None:
    meta = json.loads(Path(path).read_text())
    entry = meta.get(FIELD)
    return None if entry is None else parse_entry(entry)


def pretrain_digests(checkpoint: str) -> np.ndarray | None:
    """The sorted pretraining-image digests in ``checkpoint``'s sidecar (``<checkpoint>.json``); None when
    the sidecar (or the digests in it) is missing. Read once per process and sidecar version."""
    sidecar = Path(f"{checkpoint}.json")
    if not sidecar.is_file():
        return None
    stat = sidecar.stat()
    return _sidecar_digests(str(sidecar), stat.st_mtime_ns, stat.st_size)


def count_in(digests: np.ndarray, sorted_reference: np.ndarray) -> int:
    """How many of ``digests`` (one per image, duplicates counted) are in ``sorted_reference``."""
    if len(digests) == 0 or len(sorted_reference) == 0:
        return 0
    where = np.searchsorted(sorted_reference, digests)
    where[where == len(sorted_reference)] = 0
    return int(np.count_nonzero(sorted_reference[where] == digests))
