"""Every setting a profile can give is read by the code: a declared setting nothing reads lets a
user change a number that changes nothing."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from flows.config import Settings

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "tasks", "models", "data_contracts")


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _fields(ann, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", name))
    return out


def test_every_setting_is_read_somewhere() -> None:
    code = "\n".join(
        path.read_text(encoding="utf-8") for pkg in PACKAGES for path in (ROOT / pkg).rglob("*.py")
    )
    unread = [
        dotted
        for dotted, name in _fields(Settings)
        # an attribute read (settings.x.name, ts.name) or a lookup by name (["name"], "name")
        if not re.search(rf"\.{name}\b|\[\s*[\"']{name}[\"']\s*\]|getattr\([^)]*[\"']{name}", code)
    ]
    assert not unread, f"settings that no code reads: {unread}"
