"""``guardserve targets add/list/show/rm/calibrate`` through the real command-line entry point."""

from __future__ import annotations

import json

import pytest

from guardserve.cli import main


@pytest.fixture
def db(tmp_path, monkeypatch):
    path = tmp_path / "policy.db"
    monkeypatch.setenv("GUARDSERVE_DB", str(path))
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_add_list_show_rm(db, capsys):
    rc, out, _ = run(capsys, "targets", "add", "Gygreim Houtus", "-a", "Houtus", "-f", "birth_place=Jostem Falls",
                     "--kind", "person", "--json")
    assert rc == 0
    t = json.loads(out)
    assert t["name"] == "Gygreim Houtus" and t["aliases"] == ["Houtus"] and t["facts"] == {"birth_place": "Jostem Falls"}
    rc, out, _ = run(capsys, "targets", "list", "--json")
    assert [x["id"] for x in json.loads(out)] == [t["id"]]
    rc, out, _ = run(capsys, "targets", "list")
    assert "Gygreim Houtus" in out and t["id"] in out
    rc, out, _ = run(capsys, "targets", "show", "gygreim houtus", "--json")
    shown = json.loads(out)
    assert shown["id"] == t["id"] and [a["action"] for a in shown["audit"]] == ["add"]
    rc, out, _ = run(capsys, "targets", "show", t["id"])
    assert "birth_place = Jostem Falls" in out and "audit #1" in out
    rc, out, _ = run(capsys, "targets", "rm", t["id"], "--json")
    assert json.loads(out) == {"id": t["id"], "name": "Gygreim Houtus", "deleted": True}
    rc, out, _ = run(capsys, "targets", "list", "--json")
    assert json.loads(out) == []


def test_bulk_add_from_file(db, capsys, tmp_path):
    f = tmp_path / "targets.json"
    f.write_text(json.dumps([{"name": "A Person"}, {"name": "A Topic", "kind": "topic", "tenant": "acme"}]))
    rc, out, _ = run(capsys, "targets", "add", "--file", str(f), "--json")
    assert rc == 0 and [x["name"] for x in json.loads(out)] == ["A Person", "A Topic"]
    rc, out, _ = run(capsys, "targets", "list", "--tenant", "zeta", "--json")
    assert [x["name"] for x in json.loads(out)] == ["A Person"]


@pytest.mark.parametrize("argv, message", [
    (["targets", "add", ""], "name: must not be empty"),
    (["targets", "add", "X", "-f", "novalue"], "ATTR=VALUE"),
    (["targets", "add", "X", "--kind", "planet"], "kind: expected one of"),
    (["targets", "add", "Bad\x07Name"], "control character"),
    (["targets", "add"], "NAME"),
    (["targets", "show", "nobody"], "no target"),
    (["targets", "rm", "nobody"], "no target"),
])
def test_user_mistakes_are_one_line_errors(db, capsys, argv, message):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_duplicate_is_refused(db, capsys):
    assert run(capsys, "targets", "add", "Ada Quill")[0] == 0
    rc, _, err = run(capsys, "targets", "add", "ada quill")
    assert rc == 2 and "already exists" in err


def test_unreachable_postgres_is_a_clear_error(capsys):
    rc, _, err = run(capsys, "targets", "list", "--db", "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert rc == 2 and "cannot reach the policy store" in err and "Connection refused" in err


def test_calibrate_stores_what_a_detector_then_uses(db, capsys, tmp_path, monkeypatch):
    from guardserve.classifiers import Detector, DetectorConfig
    from guardserve.classifiers.evaluation import world_targets
    from guardserve.demo.world import build_world
    from guardserve.policy import open_store

    monkeypatch.setenv("GUARDSERVE_HOME", str(tmp_path / "home"))
    rc, _, err = run(capsys, "targets", "calibrate")
    assert rc == 2 and "no targets are registered" in err
    f = tmp_path / "targets.json"
    f.write_text(json.dumps(world_targets(build_world(seed=0))[:6]))
    assert run(capsys, "targets", "add", "--file", str(f))[0] == 0
    rc, out, _ = run(capsys, "targets", "calibrate", "--json")
    result = json.loads(out)
    assert rc == 0 and result["targets"] == 6 and result["fp_rate"] <= 0.002
    assert 0.6 <= result["threshold"] < 0.8 and 0 < result["named_margin"] < 0.2
    with open_store(str(db)) as store:
        det = Detector(store, DetectorConfig(use_embeddings=False))
        assert (det.threshold, det.named_margin) == (result["threshold"], result["named_margin"])
    rc, _, err = run(capsys, "targets", "calibrate", "--max-fp", "2")
    assert rc == 2 and "--max-fp" in err
