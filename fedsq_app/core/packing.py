"""The travelling arrays on the wire: one flat array per dtype instead of one ``Array`` per tensor.

Flower 1.42 moves a message as about two objects per ``Array``, one RPC each, through the SuperLink: the
small CNN's 22 tensors made 42 objects per message, and the transfers were most of a deployed round
(docs/PERFORMANCE.md). Packed, Q travels as one float32 array (and one int64 array for BN's batch counters).

Nothing about the layout travels: both sides split by their *own* model's keys (sorted), shapes and
dtypes. The server's checks (``fedsq_app.core.replies``) therefore still read what each payload decodes
to: a packed array must decode to exactly its dtype and the summed size of the template's arrays of that
dtype, or the reply is rejected. An unpacked ``ArrayRecord`` (one ``Array`` per key, as Flower's own apps
send) is read too, with the same checks. The strategies pack only with ``pack_arrays=True`` (this app's
``make_strategy``); this app's ClientApp replies in the format it received.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

PREFIX = "packed/"  # + the dtype's name: the key of one packed array in the message's ArrayRecord


def decoded_array(array, key: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | str:
    """The array's bytes decoded, or why they are not ``dtype[shape]``: checks what the payload holds (its
    decoded dtype, shape and byte length), not the ``Array``'s declared metadata."""
    try:
        value = array.numpy()
    except Exception as error:  # a payload numpy cannot read (or that would need pickle)
        return f"'{key}' does not decode ({type(error).__name__}: {error})"
    if not isinstance(value, np.ndarray):
        return f"'{key}' decodes to {type(value).__name__}, not an array"
    if value.dtype != dtype or tuple(value.shape) != shape:
        return f"'{key}' decodes to {value.dtype}{list(value.shape)}, expected {dtype}{list(shape)}"
    if value.nbytes != math.prod(shape) * dtype.itemsize:
        return f"'{key}' holds {value.nbytes} bytes, expected {math.prod(shape) * dtype.itemsize}"
    return value


def _groups(template: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
    """dtype name -> the template's keys of that dtype, sorted: the packed layout."""
    groups: dict[str, list[str]] = {}
    for key in sorted(template):
        groups.setdefault(np.dtype(template[key].dtype).name, []).append(key)
    return groups


def pack(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``arrays`` as one flat ``Array`` per dtype, each the concatenation of its keys' values in key order."""
    return ArrayRecord({PREFIX + name: Array(np.concatenate([np.asarray(arrays[k]).reshape(-1) for k in keys]))
                        for name, keys in _groups(arrays).items()})


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """An ``ArrayRecord`` of one ``Array`` per key, packed."""
    return pack({key: array.numpy() for key, array in record.items()})


def is_packed(record: ArrayRecord) -> bool:
    return len(record) > 0 and all(key.startswith(PREFIX) for key in record.keys())


def decode_arrays(record: ArrayRecord, template: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | str:
    """``template``'s arrays as ``record`` carries them (packed or one per key), or why it cannot: every
    payload must decode to exactly the dtype and size the template gives it. Values are not checked here."""
    if not is_packed(record):
        missing, extra = sorted(set(template) - set(record)), sorted(set(record) - set(template))
        if missing or extra:
            return f"array keys differ from the global model: missing {missing[:3]}, unexpected {extra[:3]}"
        values = {}
        for key, current in template.items():
            value = decoded_array(record[key], key, tuple(current.shape), np.dtype(current.dtype))
            if isinstance(value, str):
                return value
            values[key] = value
        return values
    groups = _groups(template)
    expected = sorted(PREFIX + name for name in groups)
    if sorted(record.keys()) != expected:
        return f"packed arrays {sorted(record.keys())[:3]} differ from the global model's {expected}"
    values = {}
    for name, keys in groups.items():
        sizes = [math.prod(np.shape(template[k])) for k in keys]
        flat = decoded_array(record[PREFIX + name], PREFIX + name, (sum(sizes),), np.dtype(name))
        if isinstance(flat, str):
            return flat
        offsets = np.cumsum([0] + sizes)
        for key, start, stop in zip(keys, offsets[:-1], offsets[1:]):
            values[key] = flat[start:stop].reshape(np.shape(template[key]))
    return {key: values[key] for key in template}  # the template's order, like a per-key record
