"""Compaction of a table's part files: small parts are merged once there are many of them.

Part of the store's table logic (a mixin of data_contracts.store.Store), written once on top of
its backend. The merged part takes the newest sequence among the parts it merges and leaves
out the rows that a newer part outside the merge overrides, so a merge never changes which
version of a key wins. Where writers on other machines may be uploading (object storage), only
parts older than the store's `compact_grace_s` are merged, so a part still being uploaded
elsewhere cannot be shadowed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pyarrow as pa

from data_contracts import rows
from data_contracts.parts import Listing, Part, PartBackend, part_seq
from data_contracts.tables import TableRef


class Compaction:
    """The compaction half of data_contracts.store.Store: what it needs of the store is
    declared here, so this module does not import the store."""

    backend: PartBackend
    compact_grace_s: float
    max_small_parts: int
    target_part_bytes: int
    _listing: Callable[..., Listing]  # (name, writing) -> the table's parts
    _concat: Callable[..., pa.Table]  # (table, listing, ...) -> the parts' rows, one version each
    _write_part: Callable[..., Part]  # (table, rows, seq) -> the part written

    def _small_parts(self, table: TableRef, below: int) -> Listing:
        listing = self._listing(table.name, writing=True)
        # Where writers elsewhere may be uploading, only parts old enough that no upload still
        # running can sort before them.
        elsewhere = self.backend.writers_elsewhere
        cutoff = time.time_ns() - int(self.compact_grace_s * 1e9)
        return {
            p: stamp
            for p, stamp in listing.items()
            if stamp[0] < below and (not elsewhere or part_seq(p) <= cutoff)
        }

    def _maybe_compact(self, table: TableRef) -> None:
        small = self._small_parts(table, self.target_part_bytes // 2)
        if len(small) > self.max_small_parts:
            for run in self._runs(small):
                self._merge(table, run)

    def compact(self, table: TableRef) -> int:
        """Merge the small part files of a table (below the target part size) into parts of
        about the target size; returns the number merged.

        On object storage only parts older than `compact_grace_s` are merged, and one process
        at a time should compact a table (see data_contracts.store).
        """
        with self.backend.locked(table.name):
            small = self._small_parts(table, self.target_part_bytes)
            return sum(len(run) for run in self._runs(small) if self._merge(table, run))

    def _runs(self, small: Listing) -> list[list[Part]]:
        """The parts `small` in sequence order, cut into runs of two or more whose files add up
        to at most the target part size: a merge reads its run into memory, so memory follows
        one target part, never the table (a 2.3 GB table merged at once held ~5 GB)."""
        runs: list[list[Part]] = []
        run: list[Part] = []
        size = 0
        for p in sorted(small, key=part_seq):
            if run and size + small[p][0] > self.target_part_bytes:
                runs.append(run)
                run, size = [], 0
            run.append(p)
            size += small[p][0]
        runs.append(run)
        return [r for r in runs if len(r) > 1]

    def _merge(self, table: TableRef, parts: list[Part]) -> bool:
        """Merge `parts` into one part; False when one of them vanished meanwhile.

        The merged part takes the newest sequence among the merged parts, and a row that a
        newer part outside the merge overrides is left out, so the merge never changes which
        version of a key wins, even with writers on other machines. It is written before the
        parts it replaces are deleted: a crash in between leaves duplicates that reads resolve.
        """
        key = list(table.key)
        listing = self._listing(table.name, writing=True)
        merging = {p: listing[p] for p in parts if p in listing}
        if len(merging) < len(parts):
            return False
        seqs = [part_seq(p) for p in merging]
        try:
            t = self._concat(table, merging, None)
            # Only a part newer than some merged part can override one of its rows.
            others = {
                q: s for q, s in listing.items() if q not in merging and part_seq(q) > min(seqs)
            }
            if others and t.num_rows:
                newest: dict[tuple, int] = {}
                read = self.backend.read_parts(table.name, others, key)
                for q, _, keys_q in read:
                    for k in rows.key_list(keys_q, key):
                        newest[k] = max(newest.get(k, 0), part_seq(q))
                source = [seqs[i] for i in t.column("__part").to_pylist()]
                keep = [
                    newest.get(k, -1) < s
                    for k, s in zip(rows.key_list(t, key), source, strict=True)
                ]
                t = t.filter(pa.array(keep, pa.bool_()))
        except FileNotFoundError:
            return False  # another machine merged or rewrote a part meanwhile: merge later
        merged = t.drop_columns(["__part"]).replace_schema_metadata(table.contract.schema.metadata)
        self._write_part(table, merged, seq=max(seqs))
        for p in merging:
            self.backend.remove_part(p)
        return True
