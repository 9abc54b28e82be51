"""The server's per-round checkpoint: everything needed to continue a run exactly where it stopped.

One file, ``checkpoint.safetensors`` in the run's output directory, replaced atomically (temp file +
rename) after every round, so a crash at any moment leaves either the previous round's checkpoint or the
new one, never a torn one. Tensors (the global model = FedSQ's Q, the best-so-far model, the server
optimiser's arrays, torch's RNG state) are safetensors entries; everything else (round number, per-round
metrics, Python/NumPy RNG state, the strategy's scalar state) is JSON in the safetensors header.
Nothing is pickled.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as load_bytes
from safetensors.numpy import save as save_bytes

from fedsq_app.util import write_atomic

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "fedsq-checkpoint-v1"


@dataclass
class RunState:
    """The server's state after ``round`` (0 = before the first round)."""

    round: int
    arrays: dict[str, np.ndarray]  # the global model that round ``round + 1`` sends out
    best_round: int
    best_val_accuracy: float
    best_arrays: dict[str, np.ndarray]
    results: dict  # what results.json held after ``round``
    structural_sha256: str
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    strategy_info: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)  # see capture_rng


# ---------------------------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    """Seed the server process's global RNGs (Flower samples nodes with ``random.sample``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> tuple[dict, dict[str, np.ndarray]]:
    """Python and NumPy RNG state as JSON, torch's as uint8 arrays."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    info = {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    arrays = {"torch": torch.get_rng_state().numpy()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            arrays[f"cuda{index}"] = state.numpy()
    return info, arrays


def restore_rng(info: dict, arrays: dict[str, np.ndarray]) -> None:
    if not info:
        return
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.from_numpy(arrays["torch"].copy()))
    cuda = [torch.from_numpy(arrays[k].copy()) for k in sorted(a for a in arrays if a.startswith("cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------- files
def save_run_state(folder: Path, state: RunState) -> Path:
    """Write ``folder/checkpoint.safetensors`` atomically; returns its path."""
    rng_info, rng_arrays = state.rng.get("info", {}), state.rng.get("arrays", {})
    best_is_current = state.best_round == state.round
    tensors = {f"global/{k}": v for k, v in state.arrays.items()}
    if not best_is_current:  # the usual case late in a run: the best model is an older one
        tensors.update({f"best/{k}": v for k, v in state.best_arrays.items()})
    tensors.update({f"strategy/{k}": v for k, v in state.strategy_arrays.items()})
    tensors.update({f"rng/{k}": v for k, v in rng_arrays.items()})
    header = {
        "round": state.round, "best_round": state.best_round, "best_val_accuracy": state.best_val_accuracy,
        "best_is_current": best_is_current, "structural_sha256": state.structural_sha256,
        "strategy_info": state.strategy_info, "rng": rng_info, "results": state.results,
        "shapes": {k: list(np.shape(v)) for k, v in tensors.items()},  # safetensors.numpy turns () into (1,)
    }
    blob = save_bytes({k: v if v.flags.c_contiguous else v.copy(order="C") for k, v in tensors.items()},
                      metadata={"format": FORMAT, "state": json.dumps(header)})
    return write_atomic(folder / CHECKPOINT_FILE, blob)


def load_run_state(folder: str | Path) -> RunState:
    path = Path(folder).expanduser() / CHECKPOINT_FILE
    blob = path.read_bytes()
    tensors = load_bytes(blob)
    metadata = _header_metadata(blob)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format={metadata.get('format')!r})")
    header = json.loads(metadata["state"])
    tensors = {k: v.reshape(header["shapes"][k]) for k, v in tensors.items()}

    def group(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    arrays = group("global/")
    return RunState(
        round=header["round"], arrays=arrays, best_round=header["best_round"],
        best_val_accuracy=header["best_val_accuracy"],
        best_arrays=arrays if header["best_is_current"] else group("best/"),
        results=header["results"], structural_sha256=header["structural_sha256"],
        strategy_arrays=group("strategy/"), strategy_info=header["strategy_info"],
        rng={"info": header["rng"], "arrays": group("rng/")},
    )


def _header_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header length, then JSON)."""
    length = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + length]).get("__metadata__", {})
