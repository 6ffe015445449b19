"""The settings registry (guardserve/config.py): every GUARDSERVE_* variable declared once,
read through one parser, and the README's table generated from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guardserve import config

ROOT = Path(__file__).resolve().parents[1]


def test_every_variable_the_code_names_is_declared():
    named = set()
    for path in (ROOT / "guardserve").rglob("*.py"):
        named |= set(re.findall(r"GUARDSERVE_[A-Z0-9_]+[A-Z0-9]", path.read_text()))
    assert named - set(config.SETTINGS) == set(), "declare these in guardserve/config.py"


def test_only_config_reads_the_environment_for_settings():
    readers = []
    for path in (ROOT / "guardserve").rglob("*.py"):
        for line in path.read_text().splitlines():
            if re.search(r"(environ\.get|getenv)\(\s*[\"']GUARDSERVE_", line) and path.name != "config.py":
                readers.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert readers == [], readers


def test_readme_table_is_generated_from_the_registry():
    from guardserve.readme import replace_between_markers

    readme = (ROOT / "README.md").read_text()
    expected = replace_between_markers(readme, config.settings_table(), config.README_BEGIN, config.README_END)
    assert readme == expected, "run: python -m guardserve.config --readme README.md"


def test_one_parser_for_flags(monkeypatch):
    monkeypatch.setenv("GUARDSERVE_ALLOW_CLIENT_TEMPLATES", "Yes")
    assert config.get("GUARDSERVE_ALLOW_CLIENT_TEMPLATES") is True
    monkeypatch.setenv("GUARDSERVE_STEERING_AUTOSELECT", "0")
    assert config.get("GUARDSERVE_STEERING_AUTOSELECT") is False
    monkeypatch.setenv("GUARDSERVE_STEERING_AUTOSELECT", "maybe")
    with pytest.raises(ValueError, match="GUARDSERVE_STEERING_AUTOSELECT"):
        config.get("GUARDSERVE_STEERING_AUTOSELECT")
    monkeypatch.delenv("GUARDSERVE_STEERING_AUTOSELECT")
    assert config.get("GUARDSERVE_STEERING_AUTOSELECT") is True
    monkeypatch.setenv("GUARDSERVE_MAX_BODY_BYTES", "12")
    assert config.get("GUARDSERVE_MAX_BODY_BYTES") == 12
    monkeypatch.setenv("GUARDSERVE_HOME", "  ")
    assert config.home() == Path("~/.cache/guardserve").expanduser()
