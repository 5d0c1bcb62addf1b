"""Read MER2024 label and transcript CSVs, refusing bad ones with every problem listed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from data_contracts.labels import CLASSES
from tasks.engine.errors import BadInputError


def _read_csv(path: Path, required: tuple[str, ...], what: str) -> tuple[pd.DataFrame, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{what} file {path} does not exist; give the corpus's {path.name}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise BadInputError(f"{what} file {path} is not a readable UTF-8 CSV: {e}") from e
    df.columns = [c.strip() for c in df.columns]
    problems = []
    missing = [c for c in required if c not in df.columns]
    if missing:
        problems.append(
            f"missing column(s) {', '.join(missing)} (found: {', '.join(df.columns) or 'none'}); "
            f"the file needs columns {', '.join(required)}"
        )
        return df, problems
    df["name"] = df["name"].str.strip()
    empty = df.index[df["name"] == ""].tolist()
    if empty:
        problems.append(f"empty name in data rows {[i + 2 for i in empty[:10]]}")
    dup = df["name"][df["name"].duplicated(keep=False) & (df["name"] != "")]
    if len(dup):
        problems.append(f"duplicate names: {sorted(set(dup))[:10]}")
    return df, problems


def load_labels(path: Path) -> pd.DataFrame:
    """`label-disdim.csv` (`name`, `discrete`) as rows of the labels table."""
    df, problems = _read_csv(path, ("name", "discrete"), "label")
    if "discrete" in df.columns:
        df["discrete"] = df["discrete"].str.strip().str.lower()
        bad = df[~df["discrete"].isin(CLASSES)]
        for row in bad.head(10).itertuples():
            problems.append(
                f"line {row.Index + 2}: unknown class {row.discrete!r} for {row.name!r}"
            )
        if len(bad) > 10:
            problems.append(f"... and {len(bad) - 10} more rows with unknown classes")
        if len(bad):
            problems.append(f"valid classes are: {', '.join(CLASSES)}")
    if problems:
        raise BadInputError(
            f"label file {path} refused before any work started:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return pd.DataFrame(
        {"video_id": df["name"], "label": df["discrete"], "source": Path(path).name}
    )


def load_transcripts(path: Path) -> pd.DataFrame:
    """`label-transcription.csv` (`name`, `chinese`) as a frame of video_id and text."""
    df, problems = _read_csv(path, ("name", "chinese"), "transcript")
    if problems:
        raise BadInputError(
            f"transcript file {path} refused:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return pd.DataFrame({"video_id": df["name"], "text": df["chinese"].fillna("").str.strip()})
