"""Writing outputs: one way to write a metrics/results JSON file (atomic, strict JSON)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """`value` with numpy scalars/arrays as Python values and NaN/±inf as None (strict JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """Write `data` as strict JSON to `path` atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(jsonable(data), indent=indent, allow_nan=False)
    tmp.write_text(text + "\n" if indent is not None else text)
    os.replace(tmp, path)
    return path
