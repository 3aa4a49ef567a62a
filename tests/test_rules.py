"""Rule semantics with injected detections, and `rules check` errors for bad files."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.app import app
from pipeline.run.rules import load_rules, rules_from_dict
from pipeline.settings import Settings, SettingsError

runner = CliRunner()
S = Settings()


@dataclass
class D:
    label: str
    score: float
    mask: np.ndarray


def det(label, score, share):
    m = np.zeros((10, 10), bool)
    m.flat[: int(share * 100)] = True
    return D(label, score, m)


RULES = {
    "classes": [{"name": "bag"}, {"name": "shoe"}, {"name": "chair"}],
    "defaults": {"displace": {"fill": "classical"}},
    "rules": [
        {"name": "big bags", "match": {"class": "bag", "min_size": 0.5}, "actions": [{"displace": {"x": 10}}]},
        {"name": "sure bags", "match": {"class": "bag", "min_score": 0.8}, "actions": [{"displace": {"x": 20}}],
         "continue": True},
        {"name": "any", "match": {"class": "*"}, "actions": [{"displace": {"x": 30, "fill": "sd"}}]},
        {"name": "never", "match": {"class": ["shoe", "chair"]}, "actions": [{"displace": {"x": 40}}]},
    ],
}


def plan_for(rules, dets):
    rs = rules_from_dict(rules, S)
    actions, matches = rs.plan(dets, (10, 10))
    return [(a.rule_name, a.action.params.x, a.action.params.settings.fill.backend, a.label) for a in actions], matches


def test_first_match_wins():
    acts, _ = plan_for(RULES, [det("bag", 0.9, 0.6)])
    assert acts == [("big bags", 10, "classical", "bag")]


def test_continue_goes_on_to_later_rules_and_defaults_merge():
    acts, _ = plan_for(RULES, [det("bag", 0.9, 0.2)])
    assert acts == [("sure bags", 20, "classical", "bag"), ("any", 30, "sd", "bag")]


def test_score_and_size_filters_and_wildcard():
    acts, _ = plan_for(RULES, [det("bag", 0.5, 0.2), det("shoe", 0.7, 0.1)])
    # best score first: the shoe (0.7) then the bag (0.5); neither passes the bag filters
    assert acts == [("any", 30, "sd", "shoe"), ("any", 30, "sd", "bag")]


def test_no_match_is_reported_per_detection():
    rules = {**RULES, "rules": RULES["rules"][:2], "no_match": "copy"}
    acts, matches = plan_for(rules, [det("chair", 0.9, 0.3)])
    assert acts == [] and matches[0]["rules"] is None
    assert rules_from_dict(rules, S).no_match == "copy"


def test_max_size():
    rules = {"classes": [{"name": "bag"}],
             "rules": [{"match": {"class": "bag", "max_size": 0.3}, "actions": [{"displace": {"x": 1}}]}]}
    assert len(plan_for(rules, [det("bag", 0.9, 0.2)])[0]) == 1
    assert plan_for(rules, [det("bag", 0.9, 0.5)])[0] == []


def test_shipped_rules_file_is_valid():
    rs = load_rules(Path(__file__).resolve().parents[1] / "conf" / "rules.yaml", S)
    assert [c.name for c in rs.classes] == ["handbag", "shoe", "chair"]
    assert len(rs.sha256) == 64


def test_rules_hash_changes_with_content(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rules: []\n")
    h1 = load_rules(p, S).sha256
    p.write_text("rules: []\nno_match: copy\n")
    assert load_rules(p, S).sha256 != h1


BAD = [
    ("rules:\n  - match: {class: hat}\n    actions: [{displace: {x: 1}}]\n", "rules.0.match.class", "unknown class", 2),
    ("rules:\n  - match: {class: shoe}\n    actions: [{teleport: {}}]\n", "rules.0.actions", "unknown action", 3),
    ("rules:\n  - match: {class: shoe}\n    actions:\n      - displace: {x: 5, fill: magic}\n",
     "rules.0.actions.0.displace.fill", "unknown fill backend 'magic'", 4),
    ("rules:\n  - match: {class: shoe}\n    actions:\n      - enhance: {steps: 0}\n",
     "rules.0.actions.0.enhance.steps", "greater than or equal to 1", 4),
    ("rules:\n  - match: {class: shoe}\n    actions:\n      - enhance:\n          loras: [{path: missing.safetensors}]\n",
     "rules.0.actions.0.enhance.loras.0", "LoRA file not found", 5),
    ("rules:\n  - match: {class: shoe}\n    actions:\n      - rotate: {azimuth: 400}\n",
     "rules.0.actions.0.rotate.azimuth", "-180..180", 4),
    ("rules:\n  - match: {class: shoe}\n    actions:\n      - displace: {x: 5, colour: red}\n",
     "rules.0.actions.0.displace.colour", "unknown parameter", 4),
    ("rules:\n  - match: {class: shoe, min_score: 2}\n    actions: [{displace: {x: 1}}]\n",
     "rules.0.match.min_score", "less than or equal to 1", 2),
    ("rules:\n  - match: {class: shoe}\n    actions: []\n", "rules.0.actions", "at least 1", 3),
    ("no_match: explode\n", "no_match", "'skip' or 'copy'", 1),
    ("rules:\n  - match: {class: shoe}\n    actions:\n      - displace: {x: 'far'}\n",
     "rules.0.actions.0.displace.x", "offset", 4),
    ("rules:\n  - match: {class: shoe, min_size: 0.5, max_size: 0.2}\n    actions: [{displace: {x: 1}}]\n",
     "rules.0.match", "larger than max_size", 2),
    ("defaults:\n  warp: {}\n", "defaults", "unknown action", 1),
]


@pytest.mark.parametrize("text, field, reason, line", BAD)
def test_rules_check_errors_name_file_line_field_reason(tmp_path, text, field, reason, line):
    p = tmp_path / "rules.yaml"
    p.write_text("classes:\n  - {name: shoe}\n" + text if not text.startswith(("no_match", "defaults")) else text)
    offset = 2 if not text.startswith(("no_match", "defaults")) else 0
    with pytest.raises(SettingsError) as ei:
        load_rules(p, S)
    probs = {f: (r, ln) for f, r, ln in ei.value.problems}
    assert field in probs, ei.value.problems
    assert reason in probs[field][0]
    assert probs[field][1] == line + offset
    r = runner.invoke(app, ["rules", "check", str(p)], terminal_width=200)
    assert r.exit_code == 2 and str(p) in r.output and field in r.output


def test_rules_check_prints_summary():
    r = runner.invoke(app, ["rules", "check", str(Path(__file__).resolve().parents[1] / "conf" / "rules.yaml")])
    assert r.exit_code == 0, r.output
    assert "handbag" in r.output and "enhance" in r.output and "rotate(azimuth=30" in r.output
