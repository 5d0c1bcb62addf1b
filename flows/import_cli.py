"""`merflow import-features MODALITY NAME SOURCE`: features computed elsewhere (MERTools' per-video
`.npy` files, a Parquet or CSV table) into a feature table the train flow can be pointed at
(docs/import.md), with or without their videos in the manifest (--without-videos). A store
write, like `merflow scan`: no Prefect server. Heavy modules load when the command runs, not
with the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import DataRootUrlOpt, Overrides, ProfileOpt, UsageProblem


def import_features_cmd(
    modality: Annotated[str, typer.Argument(help="visual, acoustic or text")],
    name: Annotated[
        str, typer.Argument(help="the table's name: its extractor id becomes imported-NAME")
    ],
    source: Annotated[
        Path,
        typer.Argument(
            help="a folder of <video_id>.npy files ((D,) or (T, D), MERTools' layout), or a "
            ".parquet/.csv file of video_id (or name) and one list column or D numeric columns"
        ),
    ],
    data_root: DataRootUrlOpt = None,
    without_videos: Annotated[
        bool,
        typer.Option(
            "--without-videos",
            help="for features whose videos you do not have: videos the manifest lacks are "
            "imported as feature-only rows (sha256 'no-video') and trained on, not left out",
        ),
    ] = False,
    profile: ProfileOpt = "demo",
    overrides: Overrides = None,
) -> None:
    """Import features computed elsewhere as the feature table features/MODALITY/imported-NAME;
    videos the manifest lacks are left out and listed, or with --without-videos imported as
    feature-only rows."""
    from data_contracts.location import normalize_root
    from data_contracts.store import Store
    from flows.config import load_settings
    from tasks.stores.import_features import import_features

    settings = load_settings(profile, overrides or [])
    if not (data_root or settings.data_root):
        raise UsageProblem(
            "give --data-root: the data root whose manifest names the videos (`merflow scan "
            "VIDEO_DIR --data-root ROOT` makes one), or where features imported "
            "--without-videos go"
        )
    root = normalize_root(data_root) if data_root else settings.resolved_data_root()
    report = import_features(Store(root), modality, name, source, without_videos)
    for line in report.lines():
        typer.echo(line)


def register(app: typer.Typer) -> None:
    """Add `merflow import-features` to the command line."""
    app.command("import-features")(import_features_cmd)
