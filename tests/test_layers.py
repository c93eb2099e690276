"""The package's layer order (docs/design.md): a module imports only from its own layer or lower
ones, at module level or inside functions, so no import cycle is hidden in a function body."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "msg_megatron"

# lowest first; a module may import modules of its own layer or of any layer before it
LAYERS = [
    {"__init__", "config", "patches", "permissions", "ops", "meta_memory", "tasks"},
    {"parallel"},
    {"model"},
    {"data"},
    {"optim"},
    {"checkpoint"},
    {"growth"},
    {"training"},
    {"cli", "dry_run", "dry_run_ranks", "eval", "export_megatron", "generate", "grow", "gridsearch", "hf",
     "import_megatron", "plan", "plot", "preprocess", "pretrain", "schedule_from_auto"},
]
LEVEL = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def _part(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: pathlib.Path):
    """(line, first component under msg_megatron, at module level?) of each project import."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    pkg = path.relative_to(ROOT).parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[: len(pkg) - (node.level - 1)]) if node.level > 1 else list(pkg)
                target = base + (node.module.split(".") if node.module else [])
                if not target:  # `from . import x` at the top of the package
                    target = [node.names[0].name]
            elif node.module and node.module.startswith("msg_megatron"):
                target = node.module.split(".")[1:] or [node.names[0].name]
            else:
                continue
            yield node.lineno, target[0], id(node) in top


def _modules():
    return sorted(p for p in ROOT.rglob("*.py"))


def test_every_module_has_a_layer():
    assert {_part(p) for p in _modules()} <= set(LEVEL), "add the new package to LAYERS and docs/design.md"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    here = LEVEL[_part(path)]
    wrong = [f"line {line}: imports `{target}`" for line, target, _ in _imports(path)
             if target in LEVEL and LEVEL[target] > here]
    assert not wrong, f"{path.relative_to(ROOT)} (layer {here}) imports a higher layer: {wrong}"


def test_project_imports_are_at_module_level():
    """With the layers one-way there is no cycle to hide: a project import inside a function body
    is only kept where a comment on it says why (`# lazy: ...`)."""
    inner = []
    for path in _modules():
        lines = path.read_text().split("\n")
        inner += [f"{path.relative_to(ROOT)}:{line}" for line, target, top in _imports(path)
                  if not top and "# lazy" not in lines[line - 1]]
    assert not inner, f"function-level project imports: {inner}"
