"""`merflow predict RUN VIDEO_OR_FOLDER...`: label videos with a finished training run.

Video files run here, without a Prefect server (debugging use, as `merflow task`): what they
lack is extracted with the stage engine into the data root's stores, and the manifest is left
alone. Folders run as the `predict` flow against the data root's server: scanned into the
manifest, extracted by the extract flow's stage tasks, labelled (flows/predict.py). Either
way the table is printed, written to the predictions table (split `predict`) and to a CSV under
the run folder. Heavy modules load when the command runs, not with the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import (
    OVERRIDE,
    DataRootUrlOpt,
    ProfileOpt,
    RunArg,
    UsageProblem,
    checked_run,
    connect_server,
    data_root_for,
)

ItemsArg = Annotated[
    list[str],
    typer.Argument(
        metavar="VIDEO_OR_FOLDER",
        help="video files (labelled here, no server) or folders (the predict flow), then any "
        "key=value setting overrides, e.g. models.device=cuda",
        show_default=False,
    ),
]


def split_items(items: list[str]) -> tuple[list[Path], list[Path], list[str]]:
    """Files, folders and setting overrides among the positional arguments."""
    files, folders, overrides = [], [], []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            folders.append(path.resolve())
        elif path.is_file():
            files.append(path.resolve())
        elif OVERRIDE.match(item):
            overrides.append(item)
        else:
            raise UsageProblem(f"{item} is neither a video file, a folder nor a key=value setting")
    if not files and not folders:
        raise UsageProblem("give at least one video file or folder to label")
    if files and folders:
        raise UsageProblem(
            "give video files (labelled here, without a server) or folders (the predict flow), "
            "not both in one command"
        )
    return files, folders, overrides


def predict_cmd(
    run: RunArg,
    items: ItemsArg,
    profile: ProfileOpt = "demo",
    data_root: DataRootUrlOpt = None,
) -> None:
    """Label videos with a finished training run's fold models (no retraining)."""
    from data_contracts.errors import BadInputError
    from flows.config import load_settings

    files, folders, overrides = split_items(items)
    settings = load_settings(profile, overrides)
    root = data_root_for(settings, data_root, run)
    if files:
        table, csv = _label_files(settings, root, run, files)
    else:
        table, csv = _label_folders(settings, root, run, folders, profile, overrides)
    from tasks.predict import table_text

    shown = table.drop(columns=["note"], errors="ignore")
    typer.echo(table_text(shown))
    for r in table.itertuples(index=False):
        if r.modalities == "none":
            typer.echo(f"{r.video_id}: no modality to label with; {getattr(r, 'note', '')}")
    labelled = int(table["class"].notna().sum())
    run_key = table.run_key.iloc[0] if len(table) else "-"
    typer.echo(
        f"run {run_key}: {labelled} of {len(table)} videos labelled; predictions table "
        f"(split predict) and {csv}"
    )
    if not labelled:
        raise BadInputError(
            "no video could be labelled: none has any modality's features (see the notes above; "
            "`merflow task ...` runs one stage on one video to debug it)"
        )


def _label_files(settings, root, run: str, files: list[Path]):
    """Single videos, in this process: the stage engine, then the run's models."""
    from data_contracts.store import Store
    from flows.predict import open_run
    from tasks.predict import (
        extract_here,
        failure_reasons,
        label_videos,
        load_models,
        video_rows,
        write_csv,
    )

    store = Store(root)
    trained, plan = open_run(settings, root, run)  # refused before any extraction
    videos = video_rows(files)
    computed = extract_here(plan, videos, store)
    typer.echo(f"extracted {computed} (0: already in the stores)")
    load_models(trained, settings.models.device)
    table = label_videos(store, trained, plan, videos)
    reasons = failure_reasons(store, videos)
    table = table.assign(note=[reasons.get(v, "") for v in table.video_id])
    return table, write_csv(table, trained.folder / "predict")


def _label_folders(settings, root, run: str, folders: list[Path], profile: str, overrides):
    """Folders: the predict flow against the data root's Prefect server, once the run and the
    folders' videos are found (refused before any server starts)."""
    import pandas as pd

    from flows.predict import predict_flow
    from flows.server_watch import watching
    from tasks.corpus.layout import is_video, video_extensions

    exts = video_extensions(settings.corpus.video_extensions)
    for folder in folders:
        if not any(is_video(p, exts) for p in folder.iterdir()):
            raise UsageProblem(
                f"folder {folder} holds no videos ({', '.join(sorted(exts))}); give folders of "
                "videos or video files"
            )
    checked_run(settings, root, run)

    env = connect_server(settings, settings.local_root(root))
    with watching(env):
        out = predict_flow(
            run,
            [str(f) for f in folders],
            str(root),
            profile=profile,
            overrides=list(overrides),
        )
    return pd.DataFrame(out["rows"]), out["csv"]


def register(app: typer.Typer) -> None:
    """Add `merflow predict` to the command line."""
    app.command("predict")(predict_cmd)
