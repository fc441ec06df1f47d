"""The architecture's rules, checked on the source: what may import what, how long a module may grow, what the
wheel installs, and that bench/ drives duch through its API."""
import ast
import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "pipeline", "stages", "commands")
MOST_LINES = 400  # any module of the library, the stages or the CLI
MOST_STAGE_LINES = 300  # a stage orchestrates; the work is in pipeline/
# The layers, lowest first: a module imports from its own layer and earlier ones, never from a later one. "pipeline"
# is pipeline/__init__.py and pipeline/errors.py (DuchError); "duch" the package's own __init__.py (the public face).
LAYERS = ("data", "pipeline", "pipeline.compute", "pipeline.run", "pipeline.model", "pipeline.formats",
          "pipeline.encoders", "pipeline.config", "pipeline.embed", "pipeline.archive", "pipeline.retrieval",
          "pipeline.export", "pipeline.train", "pipeline.serve", "stages", "duch", "commands", "cli")


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def imports(path: Path) -> list[str]:
    """Every module `path` imports, absolute, wherever the import statement is (functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return found


def library_modules() -> list[Path]:
    """Every module of the duch package: the folders' and the ones at the root (cli.py, __init__.py)."""
    return [p for folder in PACKAGES for p in modules(folder)] + sorted(ROOT.glob("*.py"))


def layer(path: Path) -> str | None:
    """The layer of a module of the package (LAYERS), by where it sits; None for one no layer holds."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "pipeline":
        return "pipeline" if len(parts) == 1 or parts[1] in ("__init__", "errors") else f"pipeline.{parts[1]}"
    if parts[0] == "__init__":
        return "duch"
    return {"data": "data", "stages": "stages", "commands": "commands", "cli": "cli"}.get(parts[0])


def module_file(name: str) -> Path | None:
    """The file of the longest part of a dotted `duch...` name that is a module or a package of the checkout (the
    rest names something inside it: `duch.pipeline.DuchError` is pipeline/__init__.py); None outside duch."""
    parts = name.split(".")
    if parts[0] != "duch":
        return None
    for n in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[1:n])
        for candidate in (base / "__init__.py", base.with_suffix(".py") if n > 1 else None):
            if candidate is not None and candidate.is_file():
                return candidate
    return ROOT / "__init__.py"  # `import duch` with no __init__.py yet: the package itself


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of everything `path` imports, anywhere in it (functions and TYPE_CHECKING
    blocks included); relative imports are made absolute."""
    package = ["duch", *path.relative_to(ROOT).parent.parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def test_every_module_has_a_layer():
    unplaced = [str(p.relative_to(ROOT)) for p in library_modules() if layer(p) is None]
    assert not unplaced, "no layer for these modules (add them to LAYERS): " + ", ".join(unplaced)


def test_each_layer_imports_only_earlier_layers():
    """Sub-packages form a stack (LAYERS): no cycle between them, and a lower one never needs a higher one."""
    bad = []
    for path in library_modules():
        own = layer(path)
        for line, name in imported_names(path):
            target = module_file(name)
            if target is None or own is None:
                continue
            other = layer(target)
            if other is None or LAYERS.index(other) > LAYERS.index(own):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {own} imports {name}, of {other or 'no layer'}")
    assert not bad, "imports against the layer order " + " < ".join(LAYERS) + ":\n" + "\n".join(bad)


def test_the_library_never_imports_a_stage_and_data_imports_neither():
    bad = [f"{p.relative_to(ROOT)}: {m}" for folder in ("pipeline", "data") for p in modules(folder)
           for m in imports(p) if m.startswith("duch.stages")]
    bad += [f"{p.relative_to(ROOT)}: {m}" for p in modules("data") for m in imports(p)
            if m.startswith("duch.pipeline")]
    assert not bad, "\n".join(bad)


def test_no_stage_imports_another():
    bad = [f"{p.relative_to(ROOT)}: {m}" for p in modules("stages") for m in imports(p)
           if m.startswith("duch.stages") and not m.startswith(f"duch.stages.{p.stem}")]
    assert not bad, "\n".join(bad)


def test_every_import_of_duch_goes_through_the_duch_package():
    """A bare `import data` would find any folder named data/ on the path (a user's own package) first."""
    bare = [f"{p.relative_to(ROOT)}: {m}" for folder in (*PACKAGES, "tests", "bench") for p in modules(folder)
            for m in imports(p) if m.split(".")[0] in (*PACKAGES, "cli")]
    bare += [f"cli.py: {m}" for m in imports(ROOT / "cli.py") if m.split(".")[0] in (*PACKAGES, "cli")]
    assert not bare, "\n".join(bare)


def test_modules_stay_short_and_stages_are_orchestration():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in library_modules()
            if (n := len(p.read_text().splitlines())) > (MOST_STAGE_LINES if layer(p) == "stages" else MOST_LINES)]
    assert not long, "\n".join(long)


def test_the_package_list_is_the_folders():
    """setup.cfg lists every package by hand (a per-folder mapping keeps editable installs working); a new folder
    missing from the list would be left out of the wheel."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    folders = {"duch"} | {"duch." + ".".join(init.parent.relative_to(ROOT).parts)
                          for folder in PACKAGES for init in (ROOT / folder).rglob("__init__.py")}
    assert listed == folders


def test_bench_uses_the_api_without_patching_it():
    """No benchmark assigns to an attribute of a duch module (or setattr's one): what it measures is what a user
    runs."""
    bad = []
    for path in modules("bench"):
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for a in node.names
                   if (isinstance(node, ast.Import) and a.name.startswith("duch"))
                   or (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("duch"))}
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                while isinstance(target, ast.Attribute):
                    target = target.value
                    if isinstance(target, ast.Name) and target.id in aliases:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: setattr")
    assert not bad, "\n".join(bad)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of what the wheel is made of (setuptools builds in the project folder's build/)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("setup.cfg", "pyproject.toml", "README.md", "cli.py"):
        shutil.copy(ROOT / name, source / name)
    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, capture_output=True, cwd=out)
    return next(out.glob("duch-*.whl"))


def test_the_wheel_installs_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"duch", wheel.name.split("-py3")[0] + ".dist-info"}
    for expected in ("duch/cli.py", "duch/stages/extract.py", "duch/pipeline/run/stage.py", "duch/data/readers.py"):
        assert expected in names
    # The search page's files are package data: `duch serve` from an installed wheel serves them.
    static = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "pipeline/serve/static").iterdir())
    assert static and all(f"duch/{name}" in names for name in static), static
    assert not [n for n in names if n.startswith(("duch/tests/", "duch/bench/", "duch/docs/"))]


def test_the_installed_api_works_beside_a_users_own_data_package(wheel, tmp_path, caption_dataset):
    """Installed from the wheel (not the checkout), used from a folder holding its own `data/` and `pipeline/`
    packages, as ML projects often do: duch's modules are still duch's, the user's are still the user's."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    project = tmp_path / "project"
    for package in ("data", "pipeline"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text(f"OWN = {package!r}\n")
    code = f"""
import data, pipeline
from duch.data import read_dataset
from duch.pipeline.config import ExtractConfig
import duch.data, duch.pipeline
assert data.OWN == "data" and pipeline.OWN == "pipeline"
assert duch.data.__file__.startswith({str(site)!r}) and duch.pipeline.__file__.startswith({str(site)!r})
dataset = read_dataset({str(caption_dataset)!r})
ExtractConfig(data={str(caption_dataset)!r}, run="r").validate()
print(len(dataset.items))
"""
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"
