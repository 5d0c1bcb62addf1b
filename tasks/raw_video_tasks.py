"""The Prefect tasks of the two raw-video stages: the audio split and the face crops.

Apart from tasks/media.py and tasks/faces/crop.py so that the faces stage's worker processes
(tasks/engine/video_pool.py), which import those modules, start without importing Prefect.
"""

from __future__ import annotations

import pandas as pd
from prefect import task

from data_contracts.store import Store
from tasks.corrupt import Corruption
from tasks.defaults import DEFAULT_SAMPLE_RATE
from tasks.engine.shard import ShardReport
from tasks.engine.stage import run_stage, task_options
from tasks.faces.crop import crop_faces_shard, faces_stage
from tasks.faces.settings import FaceSettings
from tasks.media import audio_stage


@task(name="extract-audio", **task_options(audio_stage))
def extract_audio_task(
    videos: pd.DataFrame,
    data_root: str,
    ffmpeg_bin: str | None = None,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    ffmpeg_threads: int = 0,
    corruption: Corruption | None = None,
) -> ShardReport:
    """Prefect task: split the audio of one shard into the store under `data_root` (with a
    corruption: noise mixed in, under the corruption's extractor id)."""
    stage = audio_stage(ffmpeg_bin, sample_rate, ffmpeg_threads, corruption)
    return run_stage(stage, videos, Store(data_root))


@task(name="crop-faces", **task_options(faces_stage))
def crop_faces_task(
    videos: pd.DataFrame, data_root: str, settings: FaceSettings | None = None
) -> ShardReport:
    """Prefect task: crop the faces of one shard into the store under `data_root`."""
    return crop_faces_shard(videos, Store(data_root), settings)
