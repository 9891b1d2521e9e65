"""Files written atomically: a temporary sibling, fsync, then a rename over the target, so a crash or a
full disk never leaves half a file and always keeps the previous one. JSON has no NaN or infinity: they
are written as null. torch is imported only to save tensors."""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from src.errors import WriteFailed


def _atomic_write(path: Path, write: Callable) -> None:
    """Write through ``write(file_object)`` into a temporary sibling, then rename over ``path``."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, WriteFailed):
            raise WriteFailed(f"cannot write {path}: {error.strerror or error}") from error
        raise


def json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null (the run's status says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_torch_save(path: Path, obj: Any, in_memory: bool = True) -> None:
    """Serialise in memory first, so a failing disk surfaces as an OSError from the file write itself; a large
    object (a feature cache) is streamed to the temporary file instead (``in_memory=False``)."""
    import torch  # here, so that reading and writing JSON never needs torch

    if not in_memory:
        _atomic_write(path, lambda f: torch.save(obj, f))
        return
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic_write(path, lambda f: f.write(buffer.getbuffer()))
