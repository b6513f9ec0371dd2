"""The package's architecture, checked from its source: layers point down only, and there is one training loop."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fdpipe"
STAGES = ("extract", "distill", "finetune", "analyze")
LOWER = ("store", "replay", "data", "models", "training", "augment", "runtime", "errors", "options")


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


def test_no_lower_layer_imports_a_stage_and_no_stage_imports_another():
    assert layering_violations() == []


def test_the_layering_check_catches_a_lower_layer_importing_a_stage(tmp_path):
    fake = tmp_path / "fdpipe"
    (fake / "store").mkdir(parents=True)
    (fake / "finetune").mkdir()
    (fake / "store" / "tools.py").write_text("from ..extract.views import encoded_image\n")
    (fake / "finetune" / "data.py").write_text("from fdpipe.distill.order import epoch_rng\n")
    assert layering_violations(fake) == ["fdpipe/finetune/data.py imports fdpipe.distill.order",
                                         "fdpipe/store/tools.py imports fdpipe.extract.views"]


def test_there_is_one_optimizer_step_call_site_the_engines():
    sites = [f"{p.relative_to(PKG.parent)}:{i}" for p in PKG.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"optimizer\.step\(", line)]
    assert len(sites) == 1 and sites[0].startswith("fdpipe/training/loop.py"), sites


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
