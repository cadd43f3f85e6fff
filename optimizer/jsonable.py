"""Plain JSON values from what pandas and numpy hand back (one place for both directions
of "NaN is not JSON": PostgreSQL's JSONB and browsers refuse it)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from optimizer.clock import as_utc

__all__ = ["finite", "jsonable"]


def finite(value: Any) -> float | None:
    """A finite float, or None for NaN, infinities, None, booleans and non-numbers.

    >>> finite(np.float64(0.5)), finite(float("nan")), finite("x"), finite(True)
    (0.5, None, None, None)
    """
    if value is None or isinstance(value, bool | np.bool_):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def jsonable(value: Any) -> Any:
    """Plain Python values: numpy scalars unwrapped, NaN → None, timestamps → ISO strings.

    >>> jsonable({"p": np.float64("nan"), "n": np.int64(3), "ok": np.bool_(True), "xs": (1,)})
    {'p': None, 'n': 3, 'ok': True, 'xs': [1]}
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return finite(value)
    if isinstance(value, pd.Timestamp):
        return None if pd.isna(value) else value.isoformat()
    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    return value
