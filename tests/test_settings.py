from pathlib import Path

import warnings

import pytest

from pipeline.settings import ROLES, Settings, SettingsDeprecation, SettingsError, load_settings

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "settings.yaml"
    p.write_text(text)
    return p


def test_shipped_settings_file_is_valid_and_complete():
    s = load_settings(REPO / "conf" / "settings.yaml")
    assert s.base_dir == REPO
    assert s.resolve_path(s.paths.inbox) == REPO / "inbox"
    assert s.resolve_path(s.paths.outbox) == REPO / "outbox"
    for role in ROLES:
        src = s.models.source(role)
        assert src.repo and src.licence, role
    # The shipped file documents the defaults: it must not drift from them.
    assert s.models == Settings().models
    assert s.detect == Settings().detect


def test_empty_file_gives_defaults(tmp_path):
    s = load_settings(write(tmp_path, ""))
    assert s.runtime.device == "auto" and s.limits.max_pixels == 64_000_000
    assert s.base_dir == tmp_path


def test_env_var_selects_file(tmp_path, monkeypatch):
    p = write(tmp_path, "runtime: {device: cpu}\n")
    monkeypatch.setenv("PRODUCT_STUDIO_CONFIG", str(p))
    assert load_settings().runtime.device == "cpu"
    # an explicit path wins over the environment
    other = tmp_path / "o.yaml"
    other.write_text("runtime: {device: cuda:1}\n")
    assert load_settings(other).runtime.device == "cuda:1"


def test_relative_paths_resolve_against_root_next_to_file(tmp_path):
    (tmp_path / "conf").mkdir()
    p = tmp_path / "conf" / "s.yaml"
    p.write_text("root: ..\npaths: {inbox: in, outbox: /abs/out}\nmodels: {clip: {path: m/clip}}\n")
    s = load_settings(p)
    assert s.resolve_path(s.paths.inbox) == tmp_path / "in"
    assert s.resolve_path(s.paths.outbox) == Path("/abs/out")
    assert s.model_path("clip") == tmp_path / "m" / "clip"


@pytest.mark.parametrize(
    "text, field, reason, line",
    [
        ("runtime:\n  device: gpu\n", "runtime.device", "is not a device", 2),
        ("runtime:\n  dtype: float8\n", "runtime.dtype", "float32", 2),
        ("colour: red\n", "colour", "unknown field", 1),
        ("models:\n  sam:\n    repo: a/b\n    path: /x\n", "models.sam", "exactly one of", 2),
        ("models:\n  clip: {}\n", "models.clip", "exactly one of", 2),
        ("models:\n  clip: {repo: 'not a repo id!'}\n", "models.clip.repo", "not a Hub repo id", 2),
        ("models:\n  sam: {path: x.pth, model_type: vit_x}\n", "models.sam.model_type", "not a SAM model type", 2),
        ("detect:\n  margin: 3\n", "detect.margin", "less than or equal to 1", 2),
        ("detect:\n  classes:\n    - {name: bag}\n    - {name: bag}\n", "detect", "unique", 1),
        ("detect:\n  classes:\n    - {name: 'b@g'}\n", "detect.classes.0.name", "letters", 3),
        ("enhance:\n  resolution: 500\n", "enhance.resolution", "multiple of 8", 2),
        ("enhance:\n  resolution: big\n", "enhance.resolution", "auto", 2),
        ("background:\n  resolution: 4096\n", "background.resolution", "64..2048", 2),
        ("rotate:\n  fill:\n    resolution: true\n", "rotate.fill.resolution", "auto", 3),
        ("limits: {max_pixels: -1}\n", "limits.max_pixels", "greater than 0", 1),
    ],
)
def test_bad_settings_name_file_field_reason_and_line(tmp_path, text, field, reason, line):
    p = write(tmp_path, text)
    with pytest.raises(SettingsError) as ei:
        load_settings(p)
    err = ei.value
    assert err.file == str(p)
    fields = {f: (r, ln) for f, r, ln in err.problems}
    assert field in fields, err.problems
    assert reason in fields[field][0]
    assert fields[field][1] == line
    assert str(p) in str(err) and field in str(err)


def test_yaml_syntax_error_names_line(tmp_path):
    p = write(tmp_path, "runtime:\n  device: cpu\n  dtype: [float32\n")
    with pytest.raises(SettingsError) as ei:
        load_settings(p)
    (_, reason, line), = ei.value.problems
    assert "not valid YAML" in reason and line is not None


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(SettingsError, match="expected a mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"))


def test_missing_file(tmp_path):
    with pytest.raises(SettingsError, match="file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_offline_follows_env_unless_set(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_settings(write(tmp_path, "")).offline is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert load_settings(write(tmp_path, "")).offline is False
    assert load_settings(write(tmp_path, "runtime: {offline: true}\n")).offline is True


# ------------------------------------------------------------------------------------------------
# the shared fill settings (displace.fill, rotate.fill)


def test_fill_is_one_nested_model_shared_by_displace_and_rotate(tmp_path):
    from pipeline.settings import DisplaceSettings, FillSettings, RotateSettings

    assert type(DisplaceSettings().fill) is type(RotateSettings().fill) is FillSettings
    p = write(tmp_path, "displace:\n  fill:\n    backend: [lama, classical]\n    steps: 12\n    blend: 3\n"
                        "rotate:\n  fill: {backend: lama, sampler: lcm}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the nested form is not deprecated
        s = load_settings(p)
    assert s.displace.fill.backend == ["lama", "classical"] and s.displace.fill.order == ["lama", "classical"]
    assert (s.displace.fill.steps, s.displace.fill.blend) == (12, 3)
    assert s.displace.fill.recheck is True and s.displace.fill.retries == 2  # displace's defaults for the rest
    assert s.rotate.fill.backend == "lama" and s.rotate.fill.sampler == "lcm"
    assert s.rotate.fill.recheck is False and s.rotate.fill.retries == 0  # rotate's defaults for the rest
    # a name or an order is short for {backend: ...}
    assert DisplaceSettings(fill="classical").fill == DisplaceSettings(fill={"backend": "classical"}).fill


@pytest.mark.parametrize("text, section, old, new, line", [
    ("displace:\n  fill: lama\n  steps: 12\n  fill_blend: 3\n", "displace", "steps", "fill.steps", 3),
    ("displace:\n  fill: lama\n  steps: 12\n  fill_blend: 3\n", "displace", "fill_blend", "fill.blend", 4),
    ("rotate:\n  steps: 5\n  fill_steps: 12\n  fill_retries: 1\n", "rotate", "fill_steps", "fill.steps", 3),
    ("rotate:\n  steps: 5\n  fill_steps: 12\n  fill_retries: 1\n", "rotate", "fill_retries", "fill.retries", 4),
])
def test_old_flat_fill_keys_still_load_with_a_warning(tmp_path, text, section, old, new, line):
    p = write(tmp_path, text)
    with pytest.warns(SettingsDeprecation) as rec:
        s = load_settings(p)
    msgs = [str(w.message) for w in rec]
    assert f"{p}:{line}: {section}.{old} is deprecated, write {section}.{new}" in " ".join(msgs), msgs
    fill = getattr(s, section).fill
    assert getattr(fill, new.split(".")[1]) == {"steps": 12, "blend": 3, "retries": 1}[new.split(".")[1]]
    if section == "rotate":
        assert s.rotate.steps == 5  # rotate's own steps are the novel view's, not the fill's


def test_old_and_new_spelling_of_one_fill_field_is_refused(tmp_path):
    p = write(tmp_path, "displace:\n  steps: 12\n  fill:\n    steps: 13\n")
    with pytest.raises(SettingsError) as ei:
        load_settings(p)
    assert "displace.steps and displace.fill.steps both given" in str(ei.value)


@pytest.mark.parametrize("text, field, line", [
    ("displace:\n  seed: 1\n  fill:\n    backend: sd\n    steps: 0\n", "displace.fill.steps", 5),
    ("rotate:\n  fill:\n    guidance: -1\n", "rotate.fill.guidance", 3),
    ("rotate:\n  fill:\n    backend: lama\n    colour: red\n", "rotate.fill.colour", 4),
    ("displace:\n  fill: {backend: paint}\n", "displace.fill.backend", 2),
    ("rotate:\n  fill_steps: 0\n", "rotate.fill_steps", 2),  # an old key is named as written
])
def test_bad_nested_fill_field_names_file_line_and_field(tmp_path, text, field, line):
    p = write(tmp_path, text)
    with pytest.raises(SettingsError) as ei:
        load_settings(p)
    assert [(f, n) for f, _, n in ei.value.problems] == [(field, line)]
    assert f"{p}:{line}: {field}: " in str(ei.value)


def test_resolutions_default_to_auto_and_an_explicit_size_is_kept(tmp_path):
    s = load_settings(write(tmp_path, ""))
    assert (s.enhance.resolution, s.displace.fill.resolution, s.rotate.fill.resolution,
            s.background.resolution) == ("auto",) * 4
    assert load_settings(REPO / "conf" / "settings.yaml").background == Settings().background
    s = load_settings(write(tmp_path, "enhance: {resolution: 768}\ndisplace: {fill: {resolution: auto}}\n"
                                      "rotate: {fill: {resolution: 640}}\nbackground: {resolution: '1024'}\n"))
    assert (s.enhance.resolution, s.displace.fill.resolution, s.rotate.fill.resolution,
            s.background.resolution) == (768, "auto", 640, 1024)
    from pipeline.ops.actions import parse_action

    a = parse_action("enhance", {"resolution": "auto"}, s)  # an action may go back to auto
    assert a.params.settings.resolution == "auto"
    a = parse_action("displace", {"x": 5, "fill.resolution": 256}, s)
    assert a.params.settings.fill.resolution == 256


def test_action_overrides_reach_the_fill():
    from pipeline.ops.actions import parse_action
    from pipeline.errors import ParamsError

    s = Settings(displace={"fill": {"backend": "lama", "steps": 7}})
    a = parse_action("displace", {"x": 5, "fill": "sd", "fill.sampler": "lcm"}, s)
    assert (a.params.settings.fill.backend, a.params.settings.fill.sampler) == ("sd", "lcm")
    assert a.params.settings.fill.steps == 7  # the rest of the fill in force is kept
    a = parse_action("displace", {"x": 5, "fill": {"retries": 0}}, s)
    assert a.params.settings.fill.backend == "lama" and a.params.settings.fill.retries == 0
    with pytest.warns(SettingsDeprecation, match="rotate.fill_steps is deprecated, write rotate.fill.steps"):
        a = parse_action("rotate", {"azimuth": 10, "fill_steps": 4}, s)
    assert a.params.settings.fill.steps == 4 and a.params.settings.steps == Settings().rotate.steps
    with pytest.raises(ParamsError) as ei:
        parse_action("displace", {"x": 5, "fill.steps": 0, "fill.bogus": 1}, s)
    assert {f for f, _ in ei.value.problems} == {"fill.steps", "fill.bogus"}
    with pytest.raises(ParamsError) as ei, pytest.warns(SettingsDeprecation):
        parse_action("displace", {"x": 5, "steps": 0}, s)  # an old key is named as written
    assert [f for f, _ in ei.value.problems] == ["steps"]


def test_rule_file_fill_overrides_merge_over_defaults_and_old_keys_warn_with_their_line(tmp_path):
    import numpy as np
    import yaml

    from pipeline.run.rules import load_rules

    p = tmp_path / "rules.yaml"
    p.write_text(yaml.safe_dump({"version": 1, "defaults": {"displace": {"fill": {"steps": 9, "retries": 0}}},
                                 "rules": [{"match": {"class": "handbag"},
                                            "actions": [{"displace": {"x": 10, "fill": "classical"}}]},
                                           {"match": {"class": "shoe"},
                                            "actions": [{"rotate": {"azimuth": 20, "fill_steps": 4}}]}]},
                                sort_keys=False))
    with pytest.warns(SettingsDeprecation) as rec:
        rs = load_rules(p, Settings())
    line = next(i for i, t in enumerate(p.read_text().splitlines(), 1) if "fill_steps" in t)
    assert any(f"{p}:{line}: rotate.fill_steps is deprecated" in str(w.message) for w in rec)
    det = type("D", (), {"label": "handbag", "score": 0.9, "mask": np.ones((4, 4), bool)})()
    (planned,), _ = rs.plan([det], (4, 4))
    f = planned.action.params.settings.fill
    assert (f.backend, f.steps, f.retries) == ("classical", 9, 0)
    assert rs.actions[1][0].params.settings.fill.steps == 4
