"""Column helpers of the planner: ids hashed and values aligned to the pairs by position, text
kept in Arrow, and only the values a run writes or reports turned into Python objects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pac


def labels(codes: np.ndarray, names: list[str]) -> object:
    """``names[codes]`` as a column of the type pandas gives text, built by Arrow (no Python
    string per row) when that type is Arrow's (``str`` from pandas 3 on, as configured now)."""
    kind = pd.Series(["text"]).dtype
    if isinstance(kind, pd.StringDtype) and kind.storage == "pyarrow":
        picked = pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(names, pa.large_string()))
        return pd.arrays.ArrowStringArray(picked.dictionary_decode(), dtype=kind)
    return np.asarray(names, dtype=object)[codes]


def take_time(frame: pd.DataFrame, column: str, pos: np.ndarray, present: np.ndarray) -> np.ndarray:
    out = np.full(len(pos), np.datetime64("NaT"), dtype="datetime64[us]")
    if column in frame and len(frame):
        stamps = pd.to_datetime(frame[column], utc=True).dt.tz_localize(None).to_numpy(dtype="datetime64[us]")
        out[present] = stamps[pos[present]]
    return out


def objects(column: pd.Series) -> np.ndarray:
    """A column as an object array, missing values as None (Arrow, string and float columns)."""
    out = column.to_numpy(dtype=object)
    if column.dtype != object:
        out[pd.isna(out)] = None
    return out


def one_chunk(arr: pa.ChunkedArray) -> pa.Array:
    """The array of ``arr``: its only chunk as it is (no copy), else its chunks joined."""
    return arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()


def is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def text(values: object) -> pa.Array | None:
    """``values`` as an Arrow large_string array (missing values null); None unless they are
    all text or missing."""
    try:
        arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        return None
    if isinstance(arr, pa.ChunkedArray):
        arr = one_chunk(arr)
    if pa.types.is_dictionary(arr.type):  # categorical text: decoded for the one field at hand
        arr = arr.dictionary_decode()
    if pa.types.is_null(arr.type):
        return arr.cast(pa.string())
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return arr
    return None


def same_type(arrays: list[pa.Array]) -> list[pa.Array]:
    """Text arrays cast to one type (string, or large_string when any is large)."""
    kinds = {a.type for a in arrays}
    if len(kinds) <= 1:
        return arrays
    return [a.cast(pa.large_string()) for a in arrays]


def arrow(values: object) -> pa.Array | None:
    """``values`` as an Arrow array of one plain type (text, float, integer or boolean; missing
    values null), or None when they are of mixed or other types."""
    try:  # converted once, whatever the type
        arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        return None
    as_text = text(arr)
    if as_text is not None:
        return as_text
    if isinstance(arr, pa.ChunkedArray):
        arr = one_chunk(arr)
    if pa.types.is_floating(arr.type):
        return pac.add(arr.cast(pa.float64()), 0.0)  # -0.0 is 0.0, as Python compares them
    if pa.types.is_integer(arr.type):
        return arr.cast(pa.int64())
    if pa.types.is_boolean(arr.type):
        return arr
    return None


def dictionary_codes(column: object) -> tuple[np.ndarray, list[str | None]] | None:
    """``(codes, dictionary)`` of a column of dictionary-encoded text (a categorical Series, or an
    Arrow dictionary array), codes -1 where missing; ``(empty, [])`` for no column; else None."""
    if column is None:
        return np.empty(0, dtype=np.intp), []
    if isinstance(column, pd.Series) and isinstance(column.dtype, pd.CategoricalDtype):
        categories = text(column.dtype.categories)
        if categories is None:
            return None
        return column.cat.codes.to_numpy(), categories.to_pylist()
    if isinstance(column, pa.ChunkedArray) and column.num_chunks == 1:
        column = column.chunk(0)
    if isinstance(column, pa.DictionaryArray) and is_text(column.type.value_type):
        codes = column.indices
        if not pa.types.is_signed_integer(codes.type):
            codes = codes.cast(pa.int64())
        if codes.null_count:
            codes = pac.fill_null(codes, -1)
        return codes.to_numpy(zero_copy_only=False), column.dictionary.to_pylist()
    return None


def indexer(keys: object, values: object) -> np.ndarray:
    """The position in ``keys`` of each of ``values`` (-1: absent or missing), as
    ``Index.get_indexer``: hashed by Arrow when both are text, by pandas otherwise."""
    if not len(values):  # type: ignore[arg-type]
        return np.empty(0, dtype=np.intp)
    k, v = text(keys), text(values)
    if k is None or v is None:
        index = pd.Index(np.asarray(keys, dtype=object), dtype=object)
        return index.get_indexer(np.asarray(values, dtype=object))
    k, v = same_type([k, v])
    if 8 * len(v) >= len(k):
        found = pac.index_in(v, value_set=k, skip_nulls=True).fill_null(-1)
        return found.to_numpy(zero_copy_only=False).astype(np.intp)
    # A few values among many keys: hash the values, not the keys, and scan the keys once.
    unique = pac.unique(v.drop_null())
    key_to_unique = pac.index_in(k, value_set=unique).fill_null(-1).to_numpy(zero_copy_only=False)
    hits = np.flatnonzero(key_to_unique >= 0)[::-1]  # reversed: the first of equal keys wins
    unique_pos = np.full(len(unique) + 1, -1, dtype=np.intp)
    unique_pos[key_to_unique[hits]] = hits
    value_to_unique = pac.index_in(v, value_set=unique, skip_nulls=True).fill_null(-1)
    return unique_pos[value_to_unique.to_numpy(zero_copy_only=False)]


def arrow_or_series(column: pd.Series) -> pa.Array | pd.Series:
    """``column`` as an Arrow array when its values are of one plain type (converted once, as
    the merge reads a base column several times), else as it is."""
    try:
        raw = pa.array(column, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        return column
    if isinstance(raw, pa.ChunkedArray):
        raw = one_chunk(raw)
    if pa.types.is_dictionary(raw.type) and is_text(raw.type.value_type):
        return raw  # categorical text stays encoded: decoded for the one field at hand
    converted = arrow(raw)
    return column if converted is None else converted


def pair_ids(ids: pd.Series, recovered: np.ndarray, in_run: np.ndarray) -> object:
    """The pairs' ids (the links' then the recovered ones, those in the run): an Arrow-backed
    string array when they are text (no Python string per id), else an object array."""
    known = text(ids)
    found = text(pa.array(recovered, type=known.type if known is not None else None, from_pandas=True))
    if known is None or found is None:
        return np.concatenate([ids.to_numpy(dtype=object), recovered])[in_run]
    known, found = same_type([known, found])
    chosen = pa.concat_arrays([known, found]).filter(pa.array(in_run))
    return pd.arrays.ArrowStringArray(chosen, dtype=pd.StringDtype("pyarrow", na_value=np.nan))


def pair_column(column: pa.Array | pd.Series, pos: np.ndarray) -> object:
    """``column`` aligned by ``pos`` (missing where ``pos`` < 0): text kept in Arrow (or its
    pandas type) when it is, anything else as Python values."""
    if isinstance(column, pd.Series) and isinstance(column.dtype, pd.StringDtype | pd.CategoricalDtype):
        return column.array.take(pos, allow_fill=True)  # its own type, no Python object per value
    if isinstance(column, pa.Array) and (is_text(column.type) or pa.types.is_dictionary(column.type)):
        taken = column.take(pa.array(pos, mask=pos < 0))
        if pa.types.is_dictionary(taken.type):
            taken = taken.dictionary_decode()
        return pd.arrays.ArrowStringArray(taken, dtype=pd.StringDtype("pyarrow", na_value=np.nan))
    return pair_objects(column, pos)  # numbers and booleans as Python values (None where missing)


def pair_objects(column: pd.Series | None, pos: np.ndarray, *, blank: str | None = None) -> np.ndarray:
    """``column`` aligned by ``pos`` as an object array; None where ``pos`` < 0, missing, or no
    column, and where the value is ``blank``. Dictionary-encoded text is looked up in its
    dictionary (one Python value per distinct value, not per row)."""
    out = np.full(len(pos), None, dtype=object)
    if column is None or not len(column):
        return out
    if (found := dictionary_codes(column)) is not None:
        codes, dictionary = found
        lookup = np.full(len(dictionary) + 1, None, dtype=object)  # the last one: code -1, missing
        lookup[:-1] = [None if value == blank else value for value in dictionary]
        present = pos >= 0
        out[present] = lookup[codes[pos[present]]]
        return out
    if isinstance(column, pa.Array):
        taken = column.take(pa.array(pos, mask=pos < 0))
        if pa.types.is_dictionary(taken.type):
            taken = taken.dictionary_decode()
        if pa.types.is_string(taken.type) or pa.types.is_large_string(taken.type):
            out = taken.to_numpy(zero_copy_only=False)
        else:
            out[:] = taken.to_pylist()  # numbers or booleans: None where missing
    elif (as_text := text(column)) is not None:
        out = as_text.take(pa.array(pos, mask=pos < 0)).to_numpy(zero_copy_only=False)
    else:
        out[pos >= 0] = objects(column)[pos[pos >= 0]]
    if blank is not None:
        out = np.array(out, dtype=object)  # a writable copy
        out[out == blank] = None
    return out


def aligned(array: pa.Array, pos: np.ndarray, kind: pa.DataType) -> pa.Array:
    """``array`` (cast to ``kind``) taken at ``pos``: null where ``pos`` < 0."""
    n = len(pos)
    if not len(array):
        return pa.nulls(n, kind)
    array = array.cast(kind)
    if n and pos[0] >= 0 and pos[-1] - pos[0] == n - 1 and bool((np.diff(pos) == 1).all()):
        return array.slice(int(pos[0]), n)  # already in pair order: no copy
    return array.take(pa.array(pos, mask=pos < 0))


def marked(size: int, positions: np.ndarray) -> np.ndarray:
    """A boolean mask of ``size`` with True at the (non-negative) ``positions``."""
    mask = np.zeros(size, dtype=bool)
    mask[positions[positions >= 0]] = True
    return mask
