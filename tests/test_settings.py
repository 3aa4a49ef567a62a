from pathlib import Path

import pytest

from pipeline.settings import ROLES, Settings, SettingsError, load_settings

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
