"""Float32 matrices as Arrow fixed-size-list columns (one row per vector): how every store here keeps vectors."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def to_column(m: np.ndarray) -> pa.FixedSizeListArray:
    """[n, d] float32 matrix -> fixed_size_list<float32, d> column of n rows."""
    m = np.ascontiguousarray(m, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1), type=pa.float32()), m.shape[1])


def to_matrix(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Fixed-size-list column -> [n, d] float32 matrix (a fresh, writable array)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    d = col.type.list_size
    return np.array(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d)
