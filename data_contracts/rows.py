"""Row-level helpers of the store's table logic: keys, newest row per key, change detection,
and the `where` row filters of reads."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from data_contracts.contracts import Contract
from data_contracts.tables import TableRef

# A row filter: keep the rows whose value of each named column is in its collection.
Where = Mapping[str, Collection]


def check_where(table: TableRef, where: Where | None) -> dict[str, list] | None:
    """`where` as {column: list of values}, its columns checked against the contract."""
    if where is None:
        return None
    if isinstance(where, str) or not isinstance(where, Mapping):
        raise TypeError(f"where must map column names to collections of values, not {where!r}")
    names = table.contract.schema.names
    unknown = [c for c in where if c not in names]
    if unknown:
        raise ValueError(f"where names columns that table {table.name!r} lacks: {unknown}")
    out = {}
    for col, values in where.items():
        if isinstance(values, str | bytes):
            raise TypeError(f"where[{col!r}] must be a collection of values, not {values!r}")
        out[col] = list(values)
    return out


def split_where(
    table: TableRef, where: dict[str, list] | None
) -> tuple[ds.Expression | None, ds.Expression | None, list[str]]:
    """The filter pushed down to the part reads, the filter applied after the newest row per
    key is chosen, and the columns that second filter needs.

    Every version of a key has the same key columns, so a filter on key columns keeps all
    versions of a key or none: filtering before choosing the newest is exact. A filter on other
    columns could keep an older version whose newer one it drops, so it comes after.
    """
    if not where:
        return None, None, []
    key = set(table.key)
    pushed = {c: v for c, v in where.items() if c in key}
    after = {c: v for c, v in where.items() if c not in key}
    return isin(table, pushed, prune=True), isin(table, after), list(after)


def isin(table: TableRef, where: dict[str, list], prune: bool = False) -> ds.Expression | None:
    """The Arrow expression "each column's value is in its list" (None for no columns).

    `prune`: also say that each value lies between its list's least and greatest value, which
    Arrow checks against the row groups' statistics to skip whole row groups (it does not for
    the list alone).
    """
    schema = table.contract.schema
    expr = None
    for col, values in where.items():
        term = ds.field(col).isin(pa.array(values, schema.field(col).type))
        if prune and values:
            try:
                low, high = min(values), max(values)
            except TypeError:  # unorderable values (None among them): no range
                pass
            else:
                term = (ds.field(col) >= low) & (ds.field(col) <= high) & term
        expr = term if expr is None else expr & term
    return expr


def empty(table: TableRef, columns: list[str] | None) -> pa.Table:
    """No rows, with the contract's (selected) columns."""
    t = table.contract.schema.empty_table()
    return t.select(columns) if columns is not None else t


def key_list(t: pa.Table, key: list[str]) -> list[tuple]:
    return list(zip(*(t.column(k).to_pylist() for k in key), strict=True))


def keys(t: pa.Table, key: list[str]) -> set[tuple]:
    return set(key_list(t, key))


def key_mask(t: pa.Table, key: list[str], wanted: set[tuple]) -> pa.ChunkedArray:
    tuples = key_list(t, key)
    return pa.chunked_array([pa.array([k in wanted for k in tuples], pa.bool_())])


def latest_per_key(t: pa.Table, key: list[str]) -> pa.Table:
    """The last row of each key (rows come in part sequence order)."""
    if t.num_rows == 0:
        return t
    dup = t.select(key).to_pandas().duplicated(keep="last").to_numpy()
    if not dup.any():
        return t
    return t.filter(pa.array(~dup))


def split_changes(
    contract: Contract, old: pa.Table, new: pa.Table
) -> tuple[pa.Table, set[tuple], int]:
    """Drop rows identical to stored ones; return the rest and which of them replace stored keys."""
    key = list(contract.key)
    old_keys = key_list(old, key)
    position = {k: i for i, k in enumerate(old_keys)}
    new_keys = key_list(new, key)
    overlap = [(j, position[k]) for j, k in enumerate(new_keys) if k in position]
    if not overlap:
        return new, set(), 0
    new_rows = new.take([j for j, _ in overlap]).to_pylist()
    old_rows = old.select(new.column_names).take([i for _, i in overlap]).to_pylist()
    keep = np.ones(new.num_rows, dtype=bool)
    replaced: set[tuple] = set()
    unchanged = 0
    for (j, _), a, b in zip(overlap, new_rows, old_rows, strict=True):
        if a == b:
            keep[j] = False
            unchanged += 1
        else:
            replaced.add(new_keys[j])
    return new.filter(pa.array(keep)), replaced, unchanged
