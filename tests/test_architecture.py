"""The layout's rules, checked on the source (docs/ARCHITECTURE.md): import direction, no import cycle,
one owner of the checkpoint file names."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = (
    "train.py",
    "merge_params.py",
    "data_helper.py",
    "predict.py",
    "evaluate.py",
    "web_demo.py",
    "demo.py",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (annotation-only imports run nothing)."""
    nodes, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        nodes.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return nodes


def _imports(path: Path) -> set[str]:
    """Every module imported at run time anywhere in the file, top level or inside functions (lazy imports
    count: a cycle hidden in a function is still a cycle)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _graph(package: str) -> dict[str, set[str]]:
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    modules = {_module_name(f): f for f in files}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_sft_or_models():
    graph = {**_graph("sft"), **_graph("models")}
    # Package __init__ modules import their children; a child importing its package is not a cycle of code.
    graph = {k: {m for m in v if not k.startswith(m + ".")} for k, v in graph.items()}
    assert _find_cycle(graph) is None, f"import cycle: {' -> '.join(_find_cycle(graph))}"


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_direction():
    """sft/ is the model-agnostic library: it never imports models/ (families register themselves with
    transformers) nor the top-level scripts; models/ may use sft's loss and inference pieces."""
    scripts = {Path(s).stem for s in SCRIPTS} | {"utils"}
    for path in sorted((REPO_ROOT / "sft").rglob("*.py")):
        imported = {m.split(".")[0] for m in _imports(path)}
        assert "models" not in imported, f"{path.relative_to(REPO_ROOT)} imports models/"
        assert not imported & scripts, f"{path.relative_to(REPO_ROOT)} imports a script: {imported & scripts}"


def test_every_entry_point_registers_the_models():
    for script in SCRIPTS:
        source = (REPO_ROOT / script).read_text(encoding="utf-8")
        if script == "demo.py":
            continue  # no model is touched in-process (demo runs the other scripts)
        assert "register_models()" in source, f"{script} does not call models.register_models()"


def test_checkpoint_file_names_have_one_owner():
    """Only sft/checkpoint.py spells the names of the files in a checkpoint directory."""
    names = {"train_args.json", "trainer_state.json", "training_state", "adapter_config.json"}
    names.add("adapter_model.safetensors")
    offenders = []
    for path in [*sorted((REPO_ROOT / "sft").rglob("*.py")), *(REPO_ROOT / s for s in SCRIPTS)]:
        if path == REPO_ROOT / "sft" / "checkpoint.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, "use the names in sft.checkpoint instead:\n" + "\n".join(offenders)
