"""The layout's rules, checked on the source (docs/ARCHITECTURE.md): import direction, no import cycle (annotation
imports included), sft/core a leaf, one owner of the checkpoint file names, of trainer_state.json and of renaming
temporary files into place, no module of sft/ over 600 lines, and the text-only commands starting without torch."""

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


def _runtime_nodes(tree: ast.AST, *, type_checking: bool = False) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (annotation-only imports run nothing), unless
    ``type_checking``."""
    nodes, todo = [], [tree]
    while todo:
        node = todo.pop()
        is_guard = (
            isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        )
        if is_guard and not type_checking:
            todo.extend(node.orelse)
            continue
        nodes.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return nodes


def _imports(path: Path, *, type_checking: bool = False) -> set[str]:
    """Every module imported at run time anywhere in the file, top level or inside functions (lazy imports
    count: a cycle hidden in a function is still a cycle); with ``type_checking`` also the annotation-only
    imports under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    found: set[str] = set()
    for node in _runtime_nodes(tree, type_checking=type_checking):
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


def _graph(package: str, *, type_checking: bool = False) -> dict[str, set[str]]:
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    modules = {_module_name(f): f for f in files}
    return {
        name: {m for m in _imports(path, type_checking=type_checking) if m in modules and m != name}
        for name, path in modules.items()
    }


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
    """No cycle at run time, nor through the annotation-only imports under ``if TYPE_CHECKING:`` (a module that
    needs another's types must not be needed by it: the layers would not be layers)."""
    for type_checking in (False, True):
        graph = {
            **_graph("sft", type_checking=type_checking),
            **_graph("models", type_checking=type_checking),
        }
        # Package __init__ modules import their children; a child importing its package is not a cycle of code.
        graph = {k: {m for m in v if not k.startswith(m + ".")} for k, v in graph.items()}
        cycle = _find_cycle(graph)
        assert cycle is None, (
            f"import cycle{' (TYPE_CHECKING included)' * type_checking}: {' -> '.join(cycle)}"
        )


def test_core_is_a_leaf():
    """sft/core is what every part shares: it imports nothing else from sft (annotation imports included)."""
    for path in sorted((REPO_ROOT / "sft" / "core").rglob("*.py")):
        outside = {
            m
            for m in _imports(path, type_checking=True)
            if m.startswith("sft.") and not m.startswith("sft.core")
        }
        assert not outside, f"{path.relative_to(REPO_ROOT)} imports {sorted(outside)}"


def _project_python() -> list[Path]:
    """Every Python file of the project except the tests (the library, the models, the scripts, benchmarks); not
    the tools installed into .tools/ (llama.cpp's converter)."""
    return [
        p
        for p in sorted(REPO_ROOT.rglob("*.py"))
        if not {".venv", ".git", "tests", ".whl", ".tools"} & set(p.relative_to(REPO_ROOT).parts)
    ]


def _renames(tree: ast.AST) -> list[int]:
    """Lines that rename a file into place: ``os.replace``/``os.rename``/``shutil.move`` and ``Path.rename``/
    ``Path.replace`` (a one-argument ``replace``; ``str.replace`` takes two)."""
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        name = node.func.attr
        if (owner, name) in {("os", "replace"), ("os", "rename"), ("shutil", "move")} or (
            owner not in ("os", "shutil")
            and (name == "rename" or (name == "replace" and len(node.args) == 1 and not node.keywords))
        ):
            lines.append(node.lineno)
    return lines


def test_files_are_renamed_into_place_only_by_core():
    """Writing a file safely (a temporary sibling renamed over it) has one owner: sft/core/atomic.py."""
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{line}"
        for path in _project_python()
        if path != REPO_ROOT / "sft" / "core" / "atomic.py"
        for line in _renames(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert not offenders, "write through sft.core.atomic instead:\n" + "\n".join(offenders)


def test_rename_finder_finds_renames():
    source = (
        "os.replace(a, b)\ntmp.rename(out)\ntmp.replace(out)\ntext.replace('a', 'b')\nshutil.move(a, b)\n"
    )
    assert _renames(ast.parse(source)) == [1, 2, 3, 5]


def test_trainer_state_has_one_parser():
    """trainer_state.json is read in one place (sft.checkpoint.state.read_state)."""
    offenders = []
    for path in _project_python():
        if path == REPO_ROOT / "sft" / "checkpoint" / "state.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                json_reads = {
                    n.attr
                    for n in ast.walk(node)
                    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "json"
                } & {"load", "loads"}
                if "TRAINER_STATE" in names and (json_reads or "read_json" in names):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name}")
    assert not offenders, "read it with sft.checkpoint.state.read_state:\n" + "\n".join(offenders)


MAX_MODULE_LINES = 600


def test_no_module_of_sft_over_600_lines():
    """A module that grows past 600 lines holds more than one job: split it by job."""
    long = {
        str(p.relative_to(REPO_ROOT)): n
        for p in sorted((REPO_ROOT / "sft").rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


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
    """Only sft/checkpoint/layout.py spells the names of the files in a checkpoint directory."""
    names = {"train_args.json", "trainer_state.json", "training_state", "adapter_config.json"}
    names.add("adapter_model.safetensors")
    offenders = []
    for path in [*sorted((REPO_ROOT / "sft").rglob("*.py")), *(REPO_ROOT / s for s in SCRIPTS)]:
        if path == REPO_ROOT / "sft" / "checkpoint" / "layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, "use the names in sft.checkpoint.layout instead:\n" + "\n".join(offenders)


def test_flags_are_dataclass_fields():
    """Every script declares its flags as fields of a dataclass (``sft.core.flags.flag``), added to its parser
    by ``add_arguments``: only sft/core calls argparse's ``add_argument`` itself."""
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
        for path in _project_python()
        if path.parent != REPO_ROOT / "sft" / "core"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("add_argument", "add_argument_group")
    ]
    assert not offenders, "declare the flag as a dataclass field made with flag():\n" + "\n".join(offenders)


def test_text_only_commands_start_without_torch(tmp_path: Path):
    """Converting data and scoring ROUGE read and write text: they must not pay torch's and transformers' ~4 s
    import (data_helper.py, evaluate.py rouge; docs/ARCHITECTURE.md, "Start-up")."""
    import subprocess
    import sys

    conversation = (
        '{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    )
    (tmp_path / "in.jsonl").write_text(conversation + "\n")
    (tmp_path / "pred.jsonl").write_text('{"prediction": "a cat sat", "references": ["a cat sat down"]}\n')
    commands = {
        "data_helper.py": ["conversations", "--input", "in.jsonl", "--output", "out.jsonl"],
        "evaluate.py": ["rouge", "--pred_path", "pred.jsonl", "--output_json", "rouge.json"],
    }
    probe = (
        "import runpy, sys\n"
        "sys.argv = sys.argv[1:]\n"
        "sys.path.insert(0, sys.argv[0].rpartition('/')[0])  # as python SCRIPT does\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    assert stop.code in (0, None), stop.code\n"
        "print('loaded:', sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))\n"
    )
    for script, argv in commands.items():
        result = subprocess.run(
            [sys.executable, "-c", probe, str(REPO_ROOT / script), *argv],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "loaded: []" in result.stdout, (script, result.stdout)
    assert (tmp_path / "out.jsonl").is_file() and (tmp_path / "rouge.json").is_file()
