"""`merflow check` and `merflow inspect`: the feature-store health report and one video's record."""

from __future__ import annotations

import difflib
import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.cli_common import DataRootArg, RequiredDataRootOpt

if TYPE_CHECKING:  # pandas and pyarrow load in the commands, not with the command line
    from data_contracts.store import Store
    from data_contracts.tables import TableRef


class UnknownVideoError(LookupError):
    """The video id is not one of the data root's videos (exit 2: the argument is wrong)."""


def _rows(store: Store, table: TableRef, video_id: str, columns: list[str] | None = None):
    import pandas as pd

    if not store.exists(table):
        return pd.DataFrame()
    df = store.read(table, columns=columns)
    return df[df.video_id == video_id]


def _kv(record: dict[str, Any], indent: str = "  ") -> list[str]:
    return [f"{indent}{k}: {v}" for k, v in record.items()]


def _section(title: str, body: list[str]) -> list[str]:
    return ["", f"## {title}", *(body or ["  (none)"])]


def describe_video(store: Store, video_id: str) -> str:
    """Everything the data root knows about one video, as readable text."""
    import pandas as pd

    from data_contracts import tables
    from data_contracts.tables import NO_VIDEO
    from tasks.stores.quality import current_videos, find_feature_tables, quality_signals
    from tasks.training.folds import fold_assignment

    if not store.has_stores():
        raise UnknownVideoError(f"{store.root} holds no stores/: it is not a merflow data root")
    found, _ = find_feature_tables(store)
    manifest = store.read(tables.MANIFEST)
    row = manifest[manifest.video_id == video_id]
    if row.empty:
        # The videos training knows: the manifest's, and those imported without their files.
        videos = current_videos(store, [ft.ref for ft in found])
        only = videos[(videos.video_id == video_id) & (videos.sha256 == NO_VIDEO)]
        if only.empty:
            close = difflib.get_close_matches(video_id, videos.video_id.tolist(), n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownVideoError(
                f"video {video_id!r} is neither in the manifest under {store.root} nor imported "
                f"without its video file ({len(videos)} videos){hint}"
            )
        m = {
            **only.iloc[0].to_dict(),
            "feature_only": "imported without its video file: no manifest row, no artifacts",
        }
        heading = "Manifest (none: a feature-only video)"
    else:
        m = row.iloc[0].to_dict()
        heading = "Manifest"
    sha = m["sha256"]
    out = [f"# {video_id}", *_section(heading, _kv(m))]

    body = []
    for kind, table, stats in (
        ("audio", tables.AUDIO, ("sample_rate", "duration", "speech_ratio")),
        ("faces", tables.FACES, ("backend", "n_faces", "face_ratio", "mean_confidence")),
    ):
        for r in _rows(store, table, video_id).itertuples(index=False):
            exists = store.artifact_exists(r.path)
            figures = ", ".join(f"{s}={getattr(r, s)}" for s in stats)
            stale = "" if r.sha256 == sha else " [older bytes]"
            body.append(
                f"  {kind} {r.extractor_id}{stale}: {r.path} ({'present' if exists else 'MISSING'})"
                f"; {figures}"
            )
    out += _section("Artifacts", body)

    body = []
    for r in _rows(store, tables.TRANSCRIPTS, video_id).itertuples(index=False):
        conf = "" if pd.isna(r.confidence) else f", confidence {r.confidence:.3f}"
        body.append(f"  {r.extractor_id} ({r.source}{conf}, {r.n_chars} chars): {r.text}")
    out += _section("Transcripts", body)

    body = []
    for ft in found:
        cols = ["video_id", "sha256", "extractor_id", "n_items", "provenance", "created_at"]
        for r in _rows(store, ft.ref, video_id, cols).itertuples(index=False):
            stale = "" if r.sha256 == sha else " [older bytes]"
            if r.sha256 != sha and r.sha256 == NO_VIDEO:  # the manifest's bytes win
                stale = " [feature-only, not used: the manifest holds this video]"
            body.append(f"  {ft.ref.name}{stale}: dim {ft.dim}, {r.n_items} items, {r.created_at}")
            try:
                prov = json.dumps(json.loads(r.provenance or "null"), indent=2, sort_keys=True)
            except json.JSONDecodeError:
                prov = str(r.provenance)
            body += [f"    {line}" for line in f"provenance: {prov}".splitlines()]
    out += _section("Features", body)

    failures = _rows(store, tables.FAILURES, video_id)
    out += _section(
        "Failures",
        [
            f"  {r.stage} [{r.extractor_id or '-'}] {r.error_type} (attempt {r.attempt}): "
            f"{r.message}"
            for r in failures.itertuples(index=False)
        ],
    )

    labels = _rows(store, tables.LABELS, video_id)
    body = [f"  {r.label} (from {r.source})" for r in labels.itertuples(index=False)]
    try:
        folds = fold_assignment(store)
    except ValueError:  # too few labelled videos for folds
        folds = None
    if folds is not None and video_id in folds.folds:
        body.append(
            f"  CV fold {folds.folds[video_id]} of {folds.n_splits} (seed {folds.seed}; "
            f"{folds.source})"
        )
    out += _section("Label", body)
    pseudo = _rows(store, tables.PSEUDO_LABELS, video_id)
    out += _section(
        "Pseudo-labels",
        [
            f"  run {r.run_id}: {r.label} (confidence {r.confidence:.3f}, "
            f"preferred {r.preferred_model})"
            for r in pseudo.itertuples(index=False)
        ],
    )
    signals = quality_signals(store)
    s = signals[signals.video_id == video_id].drop(columns=["video_id", "sha256"])
    out += _section("Quality signals", _kv(s.iloc[0].to_dict()) if len(s) else [])

    body = []
    if store.exists(tables.FINDINGS):
        f = store.read(tables.FINDINGS)
        latest = f[f.check_id == f.check_id.max()]
        for r in latest.itertuples(index=False):
            if video_id in set(r.video_ids):
                body.append(f"  {r.level} {r.code} [{r.table}]: {r.message}")
    out += _section("Findings of the latest check", body)
    return "\n".join(out) + "\n"


def check_cmd(
    data_root: DataRootArg,
    n_splits: Annotated[
        int | None,
        typer.Option(help="CV folds to test for leakage (default: the latest training run's)"),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="CV seed (default: the latest run's)")] = None,
    cosine: Annotated[float, typer.Option(help="near-duplicate centred cosine threshold")] = 0.99,
    write: Annotated[
        bool, typer.Option(help="append findings to the store and write reports/check.md")
    ] = True,
) -> None:
    """Check the feature stores (no server): print the report; exit 1 on error-level findings."""
    from data_contracts.store import Store
    from tasks.stores.check import check_stores

    # Folds: the latest training run's (tasks/training/folds.py), unless others are asked for.
    findings = check_stores(Store(data_root), n_splits, seed, cosine, write=write)
    typer.echo(findings.markdown())
    if findings.has_errors:
        raise typer.Exit(1)


def inspect_cmd(
    video_id: Annotated[str, typer.Argument(help="the video id (file stem)")],
    data_root: RequiredDataRootOpt,
) -> None:
    """Print everything known about one video: manifest, artifacts, features, failures, labels."""
    from data_contracts.store import Store

    typer.echo(describe_video(Store(data_root), video_id))


def register(app: typer.Typer) -> None:
    """Add the `check` and `inspect` commands to the merflow CLI."""
    app.command("check")(check_cmd)
    app.command("inspect")(inspect_cmd)
