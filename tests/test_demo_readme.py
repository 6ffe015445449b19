"""README's demo figures: rendered from the models' metrics.json, written between
README's demo markers by `guardserve demo build --readme`, refused before any build when
they could not be written."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from guardserve import readme
from guardserve.demo.cli import COLUMNS, README_BEGIN, README_END, readme_markers, render_readme_section
from guardserve.demo.model import TrainConfig
from guardserve.server.process import run_group

ROOT = Path(__file__).resolve().parents[1]


def _metrics(acc: list[float], loss: float, **cfg) -> dict:
    keys = [k for _, k in COLUMNS]
    return {**dict(zip(keys, acc)), "parameters": 1_377_408, "final_loss": loss, "steps": 100,
            "config": {**asdict(TrainConfig()), **cfg}}


MODEL = _metrics([1.0, 0.9975, 0.8375, 0.7031, 1.0, 0.98], 0.30871)
RETAIN = _metrics([0.0, 1.0, 0.0, 0.7422, 1.0, 1.0], 0.3139)


def test_render_has_one_row_per_model_in_column_order():
    md = render_readme_section(MODEL, RETAIN)
    assert "| model | forget questions | retain questions | forget paraphrases | retain paraphrases | world facts " \
           "| world-fact paraphrases |" in md
    assert "| `model/` (all people) | 100.0% | 99.8% | 83.8% | 70.3% | 100.0% | 98.0% |" in md
    assert "| `retain_model/` (no forget split) | 0.0% | 100.0% | 0.0% | 74.2% | 100.0% | 100.0% |" in md
    assert md.count("\n|---") == 1 and md.count("\n| `") == 2


def test_render_states_size_schedule_and_final_losses():
    md = render_readme_section(MODEL, RETAIN)
    assert ("Both models are 1,377,408 parameters, 14 epochs (AdamW lr 3e-3, 100 warm-up steps, cosine decay), "
            "final training loss 0.3087 / 0.3139.") in md


def test_render_follows_the_metrics():
    other = _metrics([0.5] * 6, 0.5, epochs=9, lr=2.5e-4, warmup_steps=40)
    md = render_readme_section(MODEL, other)
    assert "`model/`: 1,377,408 parameters, 14 epochs (AdamW lr 3e-3, 100 warm-up steps" in md
    assert "`retain_model/`: 1,377,408 parameters, 9 epochs (AdamW lr 2.5e-4, 40 warm-up steps" in md
    alone = render_readme_section(MODEL, None)
    assert "retain_model/` (no" not in alone and "The model is 1,377,408 parameters" in alone
    assert "final training loss 0.3087." in alone


def test_written_between_the_markers_only_once_and_idempotent(tmp_path):
    path = tmp_path / "README.md"
    head, tail = "# t\n\nbefore\r\n\n", "\n\nafter ünïcode\n"
    path.write_bytes(f"{head}{README_BEGIN}\nold table\n{README_END}{tail}".encode())
    body = render_readme_section(MODEL, RETAIN)
    assert readme.update_between_markers(path, body, README_BEGIN, README_END)
    first = path.read_bytes().decode()
    assert first == f"{head}{README_BEGIN}\n{body}{README_END}{tail}"
    assert not readme.update_between_markers(path, body, README_BEGIN, README_END)
    assert path.read_bytes().decode() == first


def test_repo_readme_has_the_demo_markers_around_a_rendered_section():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count(README_BEGIN) == 1 and text.count(README_END) == 1
    section = text[text.index(README_BEGIN) + len(README_BEGIN):text.index(README_END)]
    # the generator's layout (its numbers are the last build's): a regeneration changes only figures
    assert "| `model/` (all people) |" in section and "| `retain_model/` (no forget split) |" in section
    assert "Both models are" in section and "final training loss" in section
    begin, end = readme_markers("sp32k")
    assert text.count(begin) == 1 and text.count(end) == 1
    sp32k = text[text.index(begin) + len(begin):text.index(end)]
    assert "`guardserve demo build --variant sp32k`" in sp32k and "| `retain_model/` (no forget split) |" in sp32k
    assert "tokens the corpus uses" in sp32k


def _demo_build(*args: str, home: Path):
    return run_group([sys.executable, "-m", "guardserve", "demo", "build", *args], timeout=120,
                     env={"GUARDSERVE_HOME": str(home)})


@pytest.mark.parametrize("content,needle", [
    (None, "No such file"),
    ("# no markers\n", "were not found"),
    (f"{README_BEGIN}\n{README_END}\n{README_BEGIN}\n{README_END}\n", "more than once"),
])
def test_readme_flag_refuses_before_building(tmp_path, content, needle):
    path = tmp_path / "README.md"
    if content is not None:
        path.write_text(content)
    r = _demo_build("--readme", str(path), home=tmp_path / "home")
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and r.stderr.startswith("guardserve demo: error: --readme")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "home" / "demo").exists()  # nothing was built


def test_readme_flag_is_for_the_default_build_only(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"{README_BEGIN}\n{README_END}\n")
    r = _demo_build("--readme", str(path), "--seed", "3", home=tmp_path / "home")
    assert r.returncode == 2 and "default build" in r.stderr, r.stderr
    assert not (tmp_path / "home" / "demo").exists()


@pytest.mark.slow
def test_readme_flag_writes_the_built_models_figures(tmp_path, demo):
    import json

    path = tmp_path / "README.md"
    path.write_text(f"# demo\n\n{README_BEGIN}\nold\n{README_END}\n\nrest\n")
    # the session's $GUARDSERVE_HOME, where the demo fixture built it: found in the cache
    r = run_group([sys.executable, "-m", "guardserve", "demo", "build", "--readme", str(path)], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"updated: {path} (demo figures)" in r.stdout
    model = json.loads((demo.model / "metrics.json").read_text())
    retain = json.loads((demo.retain_model / "metrics.json").read_text())
    expected = render_readme_section(model, retain)
    assert path.read_text() == f"# demo\n\n{README_BEGIN}\n{expected}{README_END}\n\nrest\n"
    assert f"{model['forget_paraphrase_accuracy']:.1%}" in expected
