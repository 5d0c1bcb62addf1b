"""Files beside the stores: per-video artifacts (wavs, face crops) and small text files.

Layout under the data root::

    artifacts/<kind>/<extractor_id>/<video_id>-<sha12><suffix>

An artifact is always written to this machine's local folder first (`artifact_path`); for a
data root on object storage `publish_artifact` uploads it (one PUT, atomic) and the local copy
stays as a cache, and `local_file` downloads an artifact once into the same local folder and
reuses it (names are content-addressed). For a local data root the local folder is the root,
so publishing and fetching have nothing to do. Written once on top of the store's backend.
"""

from __future__ import annotations

from pathlib import Path

from data_contracts.parts import PartBackend, store_write_error


class Artifacts:
    """The artifact and text-file half of data_contracts.store.Store (a mixin: it needs the
    store's `local_dir` and `backend`)."""

    local_dir: Path
    backend: PartBackend

    def artifact_path(
        self, kind: str, extractor_id: str, video_id: str, sha256: str, suffix: str
    ) -> Path:
        """Absolute local path to write one video's artifact to; its folder exists.

        For a URL root this is in the local folder; `publish_artifact` uploads it.
        """
        folder = self.local_dir / "artifacts" / kind / extractor_id
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise store_write_error(e, f"{kind} artifacts", folder, self.local_dir) from e
        return folder / f"{video_id}-{sha256[:12]}{suffix}"

    def relative(self, path: Path | str) -> str:
        """`path` relative to the data root (its local folder for a URL root), as stored in
        table rows."""
        return Path(path).resolve().relative_to(self.local_dir).as_posix()

    def absolute(self, relative: str) -> Path | str:
        """Where a path stored in a table row lives: a local path, or a URL for a URL root."""
        return self.backend.absolute(relative)

    def publish_artifact(self, path: Path | str) -> str:
        """Make an artifact written at `path` (from `artifact_path`) part of the data root and
        return its relative path for the table row: for a URL root it is uploaded (one PUT,
        atomic) and the local copy stays as the cache; a local root needs nothing."""
        rel = self.relative(path)
        self.backend.upload(Path(path), rel)
        return rel

    def local_file(self, relative: str) -> Path:
        """A local path holding the artifact stored at `relative` (for a URL root, downloaded
        once into the local folder and reused); FileNotFoundError when it is not stored."""
        local = self.local_dir / relative
        if not local.exists():
            self.backend.download(relative, local)
        return local

    def artifact_exists(self, relative: str) -> bool:
        """Whether the artifact at `relative` is stored (locally cached counts for a URL root)."""
        return (self.local_dir / relative).exists() or self.backend.exists(relative)

    # -- small files beside the stores (reports, resolved settings) -----------------------------
    def write_text(self, relative: str, text: str) -> Path | str:
        """Write a small text file at `relative` under the data root, atomically; returns where."""
        return self.backend.put_text(relative, text)

    def read_text(self, relative: str) -> str | None:
        """The text file at `relative` under the data root, or None when there is none."""
        return self.backend.get_text(relative)
