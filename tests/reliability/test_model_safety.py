"""Untrusted models and parameters: checkpoints load without pickle code execution, and run
parameters (from the UI) stay under the allowed roots.

Remote code (a model folder's own Python) runs only where a spec opts in: that is tested in
tests/models/test_extractors.py (the trust_remote_code tests), not repeated here.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from flows.config import load_settings
from flows.extract import extract_flow
from flows.safety import (
    UnsafeParameterError,
    check_all_under_roots,
    check_under_roots,
    trusted_roots,
)
from tests.reliability.helpers import REPO

SCANNED = ("models", "tasks", "flows")


def unsafe_torch_loads(source: str) -> list[int]:
    """Lines calling `torch.load(...)` (or a bare imported `load`) without weights_only=True."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        is_torch_load = (
            isinstance(f, ast.Attribute)
            and f.attr == "load"
            and isinstance(f.value, ast.Name)
            and f.value.id == "torch"
        )
        if not is_torch_load:
            continue
        safe = any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in node.keywords
        )
        if not safe:
            lines.append(node.lineno)
    return lines


def test_the_scanner_catches_unsafe_loads():
    assert unsafe_torch_loads("import torch\ntorch.load('x.pt')\n") == [2]
    assert unsafe_torch_loads("torch.load(p, weights_only=False)") == [1]
    assert unsafe_torch_loads("torch.load(p, map_location='cpu', weights_only=True)") == []


def test_no_checkpoint_is_loaded_with_pickle_code_execution():
    offenders = []
    for package in SCANNED:
        for path in sorted((REPO / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            offenders += [f"{path.relative_to(REPO)}:{n}" for n in unsafe_torch_loads(text)]
            if "from torch import load" in text:
                offenders.append(f"{path.relative_to(REPO)}: imports torch.load by name")
    assert not offenders, (
        f"torch.load without weights_only=True (arbitrary code on load): {offenders}; use "
        "safetensors or torch.load(..., weights_only=True)"
    )


# -- paths under the allowed roots -----------------------------------------------------------
def test_paths_are_resolved_before_the_check(tmp_path):
    allowed, outside = tmp_path / "data", tmp_path / "elsewhere"
    (allowed / "corpus").mkdir(parents=True)
    outside.mkdir()
    (allowed / "link").symlink_to(outside)
    roots = [str(allowed)]
    assert check_under_roots(allowed / "corpus", roots, "corpus_dir") == allowed / "corpus"
    assert check_under_roots(allowed, roots, "data_root") == allowed
    assert check_under_roots(outside, [], "corpus_dir") == outside  # no roots: no restriction
    for sneaky in (allowed / ".." / "elsewhere", allowed / "link", allowed / "link" / "x"):
        with pytest.raises(UnsafeParameterError, match="outside the allowed roots") as info:
            check_under_roots(sneaky, roots, "corpus_dir")
        assert str(outside) in str(info.value) and "corpus_dir" in str(info.value)
    with pytest.raises(UnsafeParameterError, match="outside") as info:
        check_under_roots(str(tmp_path / "data-other"), roots, "data_root")  # a prefix only
    with pytest.raises(UnsafeParameterError) as info:
        check_all_under_roots([("a", outside), ("b", "/etc"), ("c", allowed)], roots)
    assert info.value.problems[0].startswith("a ") and info.value.problems[1].startswith("b ")
    assert len(info.value.problems) == 2


def test_run_overrides_cannot_lift_the_restriction(tmp_path, monkeypatch):
    monkeypatch.setenv("MERFLOW_ALLOWED_ROOTS", f"{tmp_path}{os.pathsep}/srv/models")
    overrides = ["allowed_roots=[/]", "models.trust_remote_code=true", "faces.fps=2"]
    settings = load_settings("demo", overrides)
    with pytest.raises(UnsafeParameterError) as info:
        trusted_roots("demo", overrides, settings)
    problems = info.value.problems
    assert len(problems) == 2 and "allowed_roots" in problems[0]
    assert "trust_remote_code" in problems[1]
    assert trusted_roots("demo", ["faces.fps=2"], load_settings("demo", ["faces.fps=2"])) == [
        str(tmp_path),
        "/srv/models",
    ]
    monkeypatch.delenv("MERFLOW_ALLOWED_ROOTS")
    local = load_settings("demo", overrides)  # local CLI use: nothing to lift, nothing refused
    assert trusted_roots("demo", overrides, local) == ["/"]


@pytest.mark.server
def test_extract_flow_refuses_paths_outside_the_roots_before_any_work(
    prefect_server, corpus, tmp_path, model_overrides, monkeypatch
):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setenv("MERFLOW_ALLOWED_ROOTS", str(allowed))
    with pytest.raises(UnsafeParameterError) as info:
        extract_flow(
            str(corpus),  # outside: the corpus is under tmp_path/corpus
            profile="demo",
            data_root=str(allowed / ".." / "escaped"),
            overrides=model_overrides,
            video_dirs=[str(corpus / "video-labeled"), str(allowed)],
        )
    text = str(info.value)
    assert "corpus_dir" in text and "data_root" in text and "video_dirs entry" in text
    assert len(info.value.problems) == 3
    # Nothing written anywhere: not the refused data root, not the corpus's default one, not
    # the allowed folder.
    assert not (tmp_path / "escaped").exists() and not (corpus / "merflow").exists()
    assert not any(Path(allowed).iterdir())
