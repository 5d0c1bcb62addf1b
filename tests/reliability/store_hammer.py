"""Upsert the same failure keys over and over from one process (the concurrency tests start two).

Each round rewrites a sliding window of keys with a message naming this writer and round, so
two writers keep replacing each other's rows and the store keeps compacting.
Usage: python store_hammer.py DATA_ROOT WRITER_NAME ROUNDS N_KEYS
"""

from __future__ import annotations

import sys

from data_contracts import tables
from data_contracts.failures import failure_row, failures_frame
from data_contracts.store import Store

SHA = "0" * 64


def key_rows(n_keys: int, message: str) -> list[dict]:
    """One failure row per key `v0000`..; the same keys for every writer."""
    return [failure_row(f"v{i:04d}", SHA, "audio", message) for i in range(n_keys)]


def main() -> None:
    """Run the rounds."""
    root, name, rounds, n_keys = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = Store(root, max_small_parts=3)  # compact often: the riskiest path under concurrency
    rows = key_rows(n_keys, "seed")
    for r in range(rounds):
        start = (r * 7) % n_keys
        window = [{**row, "message": f"{name}:{r}"} for row in rows[start : start + 10]]
        store.upsert(tables.FAILURES, failures_frame(window))


if __name__ == "__main__":
    main()
