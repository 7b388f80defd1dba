"""Training checkpoints: atomic writes (local or s3://), reads with `weights_only=True`, RNG state.

A checkpoint is a plain dict that `torch.load(weights_only=True)` accepts: tensors, numbers, strings,
lists, tuples and dicts only. Its model part comes from `zoo.checkpoint_payload`, so
`ssd_core.load_model(path)` rebuilds the model from the file alone; the engine adds optimizer,
scheduler, scaler, progress counters, RNG states and the resolved training config.
"""

from __future__ import annotations

import io
import pickle
import random
from typing import Any

import numpy as np
import torch

from ssd_core.storage import atomic_write_bytes, filesystem_for, local_path

CHECKPOINT_VERSION = 1


def serialize(payload: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def write_checkpoint(uri: str, payload: dict[str, Any]) -> None:
    """Write `payload` to `uri` so that readers see the previous file or the complete new one, never a
    partial one (serialised in memory first, then storage.atomic_write_bytes: temp file + rename / one PUT)."""
    atomic_write_bytes(uri, serialize(payload))


def read_torch_file(uri: str, *, what: str = "checkpoint") -> Any:
    """torch.load(weights_only=True) of a local path or any URI storage reads (s3:// with the environment's
    endpoint, https://...), tensors on the CPU.

    A missing file is a FileNotFoundError, an unreadable one (truncated, corrupted, not a torch file) a
    ValueError; both name the file as ``what``."""
    path = local_path(uri)
    try:
        if path is not None:
            return torch.load(path, map_location="cpu", weights_only=True)
        fs, path = filesystem_for(uri)
        return torch.load(io.BytesIO(fs.cat_file(path)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {uri}") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what} {uri} cannot be read ({first})") from None


def read_checkpoint(uri: str) -> dict[str, Any]:
    """One of our checkpoints (local path or s3:// URI), tensors on the CPU."""
    return read_torch_file(uri, what="checkpoint")


# -- RNG state as weights_only-safe values --------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), NumPy and Python RNG states as tensors, ints, floats and lists."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
        numpy_state["has_gauss"], numpy_state["cached_gaussian"],
    ))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
