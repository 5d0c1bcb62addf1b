"""Run the extraction flow in a process of its own and print its summary as one JSON line.

Used by the crash and concurrency tests, which need a process they can kill or run twice at
once. The Prefect client settings come from the environment (flows.server.client_env).
Usage: python extract_driver.py CORPUS DATA_ROOT [--video-dir DIR ...] [key=value ...]
"""

from __future__ import annotations

import argparse
import json

from flows.extract import extract_flow
from tests.reliability.helpers import SUMMARY_PREFIX


def main() -> None:
    """Parse the arguments, run the flow, print the summary."""
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("data_root")
    ap.add_argument("--video-dir", action="append", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    summary = extract_flow(
        args.corpus,
        profile="demo",
        data_root=args.data_root,
        overrides=args.overrides,
        video_dirs=args.video_dir,
    )
    print(SUMMARY_PREFIX + json.dumps(summary, default=str), flush=True)


if __name__ == "__main__":
    main()
