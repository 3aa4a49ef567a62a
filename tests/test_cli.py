import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from cli.app import app
from pipeline.settings import ROLES

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cli.app import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'segment_anything', 'cv2') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_python_dash_m_cli_works():
    r = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "models" in r.stdout


def test_make_tiny_then_verify(tmp_path):
    r = runner.invoke(app, ["models", "make-tiny", str(tmp_path / "t"), "--role", "clip", "--role", "sam"])
    assert r.exit_code == 0, r.output
    cfg = tmp_path / "t" / "settings.yaml"
    r = runner.invoke(app, ["models", "verify", "--config", str(cfg), "--role", "clip", "--role", "sam"])
    assert r.exit_code == 0, r.output
    assert "clip" in r.output and "sam" in r.output and "ok" in r.output
    # the other roles were not written: verify names them and fails with exit 3
    r = runner.invoke(app, ["models", "verify", "--config", str(cfg), "--role", "depth"])
    assert r.exit_code == 3
    assert "model role 'depth'" in r.output and "does not exist" in r.output


def test_verify_all_roles_of_shared_tiny_set(tiny_dir):
    r = runner.invoke(app, ["models", "verify", "--config", str(tiny_dir / "settings.yaml")])
    assert r.exit_code == 0, r.output
    assert r.output.count(" ok ") == len(ROLES)


def test_models_list(tiny_dir):
    r = runner.invoke(app, ["models", "list", "--config", str(tiny_dir / "settings.yaml")], terminal_width=200)
    assert r.exit_code == 0, r.output
    for role in ("clip", "sam", "novel_view", "captioner"):
        assert role in r.output
    assert "tiny random weights" in r.output


def test_bad_settings_exit_2_with_file_field_reason(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("runtime:\n  device: gpu\n")
    for args in (["config", "check", "--config", str(p)], ["models", "verify", "--config", str(p)]):
        r = runner.invoke(app, args, terminal_width=200)
        assert r.exit_code == 2, r.output
        assert str(p) in r.output and "runtime.device" in r.output and "not a device" in r.output


def test_config_from_env(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("runtime: {device: cpu}\n")
    r = runner.invoke(app, ["config", "show"], env={"PRODUCT_STUDIO_CONFIG": str(p)})
    assert r.exit_code == 0 and "device: cpu" in r.output


def test_unknown_role_is_refused(tiny_dir):
    r = runner.invoke(app, ["models", "verify", "--config", str(tiny_dir / "settings.yaml"), "--role", "nope"])
    assert r.exit_code == 2 and "unknown role" in r.output
