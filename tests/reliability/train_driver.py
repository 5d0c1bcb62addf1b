"""Run the train flow in a process of its own (the crash test kills it); prints the report's
run id as one line. Usage: python train_driver.py CORPUS DATA_ROOT [key=value ...]"""

from __future__ import annotations

import sys

from flows.train import train_flow

if __name__ == "__main__":
    corpus, root, *overrides = sys.argv[1:]
    report = train_flow(corpus, profile="demo", data_root=root, overrides=overrides)
    print("TRAIN-RUN " + report["run_id"], flush=True)
