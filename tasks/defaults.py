"""Defaults that the profile's settings (flows/config.py) and the tasks both need, declared
once: the settings take them as their defaults, and a task called without settings (a test, a
notebook) uses the same value. Light on purpose: the settings load without the tasks."""

DEFAULT_SAMPLE_RATE = 16000  # Hz of the wavs the audio split writes (audio.sample_rate)
DEFAULT_RETRIES = 2  # Prefect retries of a stage's shard on transient errors (extract.retries)
