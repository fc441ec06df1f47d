"""The checkout's style checks, run with the tests so that CI runs them: ruff ([tool.ruff] in pyproject.toml) and
mypy ([tool.mypy]) find nothing."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_finds_nothing(tmp_path):
    """mypy finds modules by their import names (duch.pipeline.run...) and the checkout is the `duch` package under
    whatever folder name it was cloned to: it runs from a folder holding a `duch` link to the checkout."""
    (tmp_path / "duch").symlink_to(ROOT, target_is_directory=True)
    out = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                          "--cache-dir", str(ROOT / ".mypy_cache")], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
