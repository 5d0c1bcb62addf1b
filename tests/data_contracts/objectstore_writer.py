"""One writer process of the object-storage concurrency tests: upsert windows of shared keys
(every writer writes them) and of keys of its own, round after round.

Usage: python objectstore_writer.py DATA_ROOT_URL NAME ROUNDS N_KEYS CACHE_DIR GRACE_S
CACHE_DIR is the store's local folder: the same for two writers on one machine (they share
the lock file), different for writers that stand for two machines (no shared lock).
"""

from __future__ import annotations

import sys

from data_contracts import tables
from data_contracts.failures import failure_row, failures_frame
from data_contracts.store import Store

SHA = "0" * 64


def shared_rows(n_keys: int, message: str) -> list[dict]:
    """One failure row per shared key `v0000`..; the same keys for every writer."""
    return [failure_row(f"v{i:04d}", SHA, "audio", message) for i in range(n_keys)]


def window(r: int, n_keys: int) -> range:
    """The keys round `r` writes."""
    start = (r * 7) % n_keys
    return range(start, min(n_keys, start + 10))


def main() -> None:
    """Run the rounds."""
    root, name, rounds, n_keys = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cache_dir, grace = sys.argv[5], float(sys.argv[6])
    store = Store(root, max_small_parts=3, cache_dir=cache_dir, compact_grace_s=grace)
    for r in range(rounds):
        rows = [failure_row(f"v{i:04d}", SHA, "audio", f"{name}:{r}") for i in window(r, n_keys)]
        rows += [
            failure_row(f"{name}-{i:04d}", SHA, "audio", f"{name}:{r}") for i in window(r, n_keys)
        ]
        store.upsert(tables.FAILURES, failures_frame(rows))


if __name__ == "__main__":
    main()
