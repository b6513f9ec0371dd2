"""The package's architecture, checked from its source: layers point down only, no two modules or folders import
each other (directly or round a loop), and there is one training loop."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fdpipe"
STAGES = ("extract", "distill", "finetune", "analyze")
LOWER = ("store", "replay", "data", "models", "training", "augment", "runtime", "errors", "options", "seeds", "files",
         "sizes", "locks")


def _imports(path: Path, root: Path) -> list[str]:
    """Every fdpipe module `path` imports, as absolute dotted names (relative imports resolved)."""
    package = list(path.relative_to(root.parent).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names += [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                names.append(node.module or "")
    return [n for n in names if n == "fdpipe" or n.startswith("fdpipe.")]


def _area(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layering_violations(root: Path = PKG) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        here = _area(".".join(path.relative_to(root.parent).with_suffix("").parts))
        for mod in _imports(path, root):
            there = _area(mod)
            if there not in STAGES or there == here:
                continue
            if here in LOWER or here in STAGES:
                bad.append(f"{path.relative_to(root.parent)} imports {mod}")
    return bad


def import_cycles(root: Path = PKG) -> list[str]:
    """Every import of one top-level module or folder by another that is part of a loop (the imported one imports,
    maybe through others, the importer back). Imports inside functions count: they are a loop all the same."""
    units = {p.stem for p in root.glob("*.py")} | {p.name for p in root.iterdir() if (p / "__init__.py").exists()}
    edges = []
    for path in sorted(root.rglob("*.py")):
        here = _area(".".join(path.relative_to(root.parent).with_suffix("").parts))
        edges += [(here, there, f"{path.relative_to(root.parent)} imports {mod}") for mod in _imports(path, root)
                  if (there := _area(mod)) in units and there != here]
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            unit = todo.pop()
            if unit == goal:
                return True
            if unit not in seen:
                seen.add(unit)
                todo += graph.get(unit, ())
        return False

    return [line for a, b, line in edges if reaches(b, a)]


def private_imports(root: Path = PKG) -> list[str]:
    """Every `_name` one fdpipe module imports from another: what another module needs is a public name."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fdpipe")):
                bad += [f"{path.relative_to(root.parent)} imports {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    return bad


def planted(tmp_path: Path, files: dict[str, str]) -> Path:
    """A fake fdpipe tree of these files (path relative to the package: source), for a check to catch."""
    fake = tmp_path / "fdpipe"
    for rel, text in files.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text)
    return fake


def test_no_lower_layer_imports_a_stage_and_no_stage_imports_another():
    assert layering_violations() == []


def test_the_layering_check_catches_a_lower_layer_importing_a_stage(tmp_path):
    fake = planted(tmp_path, {"store/tools.py": "from ..extract.views import encoded_image\n",
                              "finetune/data.py": "from fdpipe.distill.order import epoch_rng\n"})
    assert layering_violations(fake) == ["fdpipe/finetune/data.py imports fdpipe.distill.order",
                                         "fdpipe/store/tools.py imports fdpipe.extract.views"]


def test_no_module_or_folder_imports_another_that_imports_it_back():
    assert import_cycles() == []


def test_the_cycle_check_catches_a_bottom_module_and_a_layer_importing_each_other(tmp_path):
    fake = planted(tmp_path, {"__init__.py": "", "store/__init__.py": "", "replay/__init__.py": "",
                              "options.py": "def views_option():\n    from .store.manifest import MAX_VIEWS\n",
                              "store/cli.py": "from ..options import views_option\n",
                              "replay/order.py": "from fdpipe.options import views_option\n"})  # no loop: not reported
    assert import_cycles(fake) == ["fdpipe/options.py imports fdpipe.store.manifest",
                                   "fdpipe/store/cli.py imports fdpipe.options"]


def test_no_module_imports_a_private_name_of_another(tmp_path):
    assert private_imports() == []
    fake = planted(tmp_path, {"data/wds.py": "from .decode import _one_line\nfrom zarr import _x\n"})
    assert private_imports(fake) == ["fdpipe/data/wds.py imports _one_line"]


def test_there_is_one_optimizer_step_call_site_the_engines():
    sites = [f"{p.relative_to(PKG.parent)}:{i}" for p in PKG.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"optimizer\.step\(", line)]
    assert len(sites) == 1 and sites[0].startswith("fdpipe/training/loop.py"), sites


# ------------------------------------------------------------------------------------ layouts are data, not branches
REPO = PKG.parent
LAYOUT_TABLE = PKG / "store" / "layouts" / "__init__.py"  # the one place that names the layouts
_NAME = r"""["'](?:zarr|wds)["']"""
LAYOUT_COMPARISON = re.compile(
    rf"""\blayout\b["'\]]*\s*(?:==|!=)"""  # layout ==, .layout !=, ["layout"] ==
    rf"""|(?:==|!=)\s*{_NAME}|{_NAME}\s*(?:==|!=)"""  # == "zarr", 'wds' !=
    rf"""|\bin\s*[(\[{{]\s*{_NAME}""")  # in ("zarr", ...), in ["wds"]


def layout_comparisons(roots: list[Path], skip: Path = LAYOUT_TABLE) -> list[str]:
    """Every line of the .py files under `roots` that compares a layout by name, as path:line."""
    hits = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if path == skip:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if LAYOUT_COMPARISON.search(line.split("#", 1)[0]):
                    hits.append(f"{path.relative_to(root.parent)}:{n}: {line.strip()}")
    return hits


def test_no_code_outside_the_layout_table_compares_layout_names():
    """A layout's behaviour lives in its class and its facts in the table (fdpipe.store.layouts), so that a new
    layout is one class and one row, not a branch in every layer."""
    assert layout_comparisons([PKG, REPO / "bench"]) == []


def test_the_layout_check_catches_each_way_of_comparing_a_layout_name(tmp_path):
    fake = tmp_path / "fdpipe"
    fake.mkdir()
    comparisons = ['if store.layout == "zarr":', "if cfg.layout != 'wds':", 'if amp["layout"] == x:',
               'x = a if "wds" == m else b', 'if layout in ("zarr", "wds"):', "ok = kind in ['wds']"]
    allowed = ['if layout not in LAYOUTS:', 'if not store.random_access:', 'x = {"zarr": 1}["zarr"]',
               'if codec == "none":', 'layout="zarr",  # == "wds" in a comment']
    (fake / "mod.py").write_text("\n".join(comparisons + allowed) + "\n")
    assert [h.split(":")[1] for h in layout_comparisons([fake])] == [str(i) for i in range(1, len(comparisons) + 1)]


def test_the_tests_are_grouped_by_the_layer_or_stage_they_test():
    """tests/<folder>/ holds the tests of fdpipe/<folder>/: a newcomer finds a module's tests by its path."""
    tests = Path(__file__).resolve().parent
    folders = [p.name for p in tests.iterdir() if p.is_dir() and p.name not in ("data", "__pycache__")]
    assert folders and all((PKG / f).is_dir() for f in folders), folders
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names))  # pytest imports test modules by their file name


BENCH = PKG.parent / "bench"


def _fdpipe_defs(root: Path = PKG) -> set[str]:
    """Every module-level function fdpipe defines: what a patch of a module would replace."""
    return {n.name for p in root.rglob("*.py") for n in ast.parse(p.read_text()).body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def patches(root: Path = BENCH, defs: set[str] | None = None) -> list[str]:
    """Assignments in root's files that replace an fdpipe attribute: `X.attr = ...` where X was imported from fdpipe,
    or attr is a module-level function fdpipe defines (`m.create_teacher = ...`, `Store.stored_targets = ...`); and any
    use of pytest's monkeypatch. bench injects readers and teachers instead (`targets=`, `create_teacher=`)."""
    defs = _fdpipe_defs() if defs is None else defs
    out = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        bound = {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names if a.name.split(".")[0] == "fdpipe"}
        bound |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                  and (n.module or "").split(".")[0] == "fdpipe" for a in n.names}
        for n in ast.walk(tree):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AugAssign) else []
            for t in targets:
                for node in ast.walk(t):
                    if not isinstance(node, ast.Attribute):
                        continue
                    root_node = node
                    while isinstance(root_node, (ast.Attribute, ast.Subscript)):
                        root_node = root_node.value
                    name = root_node.id if isinstance(root_node, ast.Name) else None
                    if name != "self" and (name in bound or node.attr in defs):
                        out.append(f"{path.name}:{n.lineno}: {ast.unparse(t)} =")
        out += [f"{path.name}:{i}: monkeypatch" for i, line in enumerate(text.splitlines(), 1) if "monkeypatch" in line]
    return out


def test_bench_injects_readers_and_teachers_instead_of_patching_fdpipe():
    assert patches() == []


def test_the_patch_check_catches_a_replaced_fdpipe_function(tmp_path):
    (tmp_path / "b.py").write_text("import importlib\nfrom fdpipe.store.reader import Store\n\n\ndef f(m):\n"
                                   "    Store.stored_targets = lambda self, pairs: None\n"
                                   "    m.create_teacher = lambda *a: None\n")
    assert patches(tmp_path) == ["b.py:6: Store.stored_targets =", "b.py:7: m.create_teacher ="]


def test_one_teacher_and_several_run_one_code_no_multi_twins_and_no_multi_flag_in_distill():
    """One teacher is a mapping of one: no `Multi*`/`Zipped*` twin classes anywhere, and distill has no `multi` flag
    to branch on."""
    twins = [f"{p.relative_to(PKG.parent)}:{n.lineno}: {n.name}" for p in PKG.rglob("*.py")
             for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef)
             and n.name.startswith(("Multi", "Zipped"))]
    flags = [f"{p.relative_to(PKG.parent)}:{n.lineno}" for p in (PKG / "distill").rglob("*.py")
             for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Name) and n.id == "multi"]
    assert twins == [] and flags == []
