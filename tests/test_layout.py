"""The package's structure, read from the source with `ast` (nothing is imported): each module imports only from its
own layer or below, there is no import cycle, nothing imports the command line, no module takes another module's
private (`_name`) names, no file grows past ~450 lines, and each module's docstring says what it owns.

The layers, bottom to top (docs/development.md):

0. `version`, `_utils`, `_targets`, `_finite`: no hf_r2 imports but each other
1. `config`, `losses`, `models`, `_r2_plan`, `_r2_kernels`: the R2 vocabulary and the model factory
2. `regularizer`, `metrics`, `data`, `saving`, `plots`: the building blocks
3. `quant`: low-bit methods and export
4. `training_args`, `trainer`, `loop_config`, `loop`, `model_card`, `progress`: training, its output and cards
5. `hub`, `train`: the Hub and the one training recipe
6. `reproduce`: the paper's comparison
7. `commands`, `cli`, `__main__`: the command line (imported by nothing)
8. `hf_r2` itself (`__init__`): curated re-exports, imported by nothing inside the package

Inside `quant` the same rule holds between its rooms (`QUANT_ROOMS`), bottom to top: the shared primitives, the
method families `ptq/`, `cluster/` and `qat` (no family imports another), `export/` (it writes what the families
produce, so it may import them), and the package `__init__`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_r2"
LAYERS = [
    {"version", "_utils", "_targets", "_finite", "output_folder"},
    {"config", "losses", "models", "_r2_plan", "_r2_kernels"},
    {"regularizer", "metrics", "data", "saving", "plots"},
    {"quant"},
    {"training_args", "trainer", "loop_config", "loop", "model_card", "checkpoints", "divergence", "progress"},
    {"hub", "train"},
    {"reproduce"},
    {"commands", "cli", "__main__"},
]
CLI = {"commands", "cli", "__main__"}
MAX_LINES = 450
QUANT_ROOMS = [
    {"_affine", "_grid", "_batches", "observers", "uniform", "layers", "calibrate", "results", "api"},
    {"qat", "ptq", "cluster"},
    {"export"},
]
QUANT_FAMILIES = QUANT_ROOMS[1]


def find_modules(package: Path) -> dict[str, Path]:
    """`{"hf_r2.quant.ptq": path, "hf_r2.quant": .../quant/__init__.py, ...}` for the package folder `package`."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(modules: dict[str, Path], name: str) -> list[tuple[str, list[str], int]]:
    """`(target module, imported names, line)` of every hf_r2 import in module `name`, lazy ones included."""
    tree = ast.parse(modules[name].read_text(encoding="utf-8"))
    package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] == "hf_r2"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "hf_r2":
                continue
            names = [alias.name for alias in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]  # `from .quant import export`
            found.append((target, [n for n in names if f"{target}.{n}" not in modules], node.lineno))
            found += [(sub, [], node.lineno) for sub in subs]
    return found


def component(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "hf_r2"


def layer(name: str) -> int:
    if component(name) == "hf_r2":
        return len(LAYERS)
    for i, members in enumerate(LAYERS):
        if component(name) in members:
            return i
    raise AssertionError(f"{name} is in no layer of tests/test_layout.py's LAYERS: add it where it belongs.")


def quant_room(name: str) -> int:
    """The room of a module of `hf_r2.quant` (`hf_r2.quant.ptq.bn` -> the families' room); the package's own
    `__init__` is above them all."""
    parts = name.split(".")
    if len(parts) == 2:
        return len(QUANT_ROOMS)
    for i, members in enumerate(QUANT_ROOMS):
        if parts[2] in members:
            return i
    raise AssertionError(f"{name} is in no room of tests/test_layout.py's QUANT_ROOMS: add it where it belongs.")


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules its imports run (a sub-module's import also runs its packages' `__init__`)."""
    graph = {name: set() for name in modules}
    for name in modules:
        for target, _, _ in imports_of(modules, name):
            while target not in modules:  # `import hf_r2.x.y` of a name defined in hf_r2.x
                target = target.rpartition(".")[0]
            if target == name:
                continue
            graph[name].add(target)
            parent = target.rpartition(".")[0]
            while parent not in ("", "hf_r2") and not (name + ".").startswith(parent + "."):
                graph[name].add(parent)
                parent = parent.rpartition(".")[0]
    return graph


def upward_imports(modules: dict[str, Path]) -> list[str]:
    graph = import_graph(modules)
    return sorted(f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
                  for name in modules for target in graph[name] if layer(target) > layer(name))


def quant_modules(modules: dict[str, Path]) -> list[str]:
    return [name for name in modules if name.split(".")[:2] == ["hf_r2", "quant"]]


def quant_upward_imports(modules: dict[str, Path]) -> list[str]:
    graph = import_graph(modules)
    inside = set(quant_modules(modules))
    return sorted(f"{name} (room {quant_room(name)}) imports {target} (room {quant_room(target)})"
                  for name in inside for target in graph[name] & inside if quant_room(target) > quant_room(name))


def family_crossings(modules: dict[str, Path]) -> list[str]:
    """Imports from one method family of `hf_r2.quant` into another (`ptq` -> `cluster`)."""
    graph = import_graph(modules)
    inside = set(quant_modules(modules))

    def family(name: str) -> str | None:
        parts = name.split(".")
        return parts[2] if len(parts) > 2 and parts[2] in QUANT_FAMILIES else None

    return sorted(f"{name} imports {target}" for name in inside for target in graph[name] & inside
                  if family(name) and family(target) and family(name) != family(target))


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph = import_graph(modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                cycles.append(sorted(members))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def private_imports(modules: dict[str, Path]) -> list[str]:
    return [f"{name}:{line} takes {imported} from {target}"
            for name in modules for target, names, line in imports_of(modules, name)
            for imported in names if imported.startswith("_") and not imported.startswith("__") and target != name]


MODULES = find_modules(PACKAGE)


def test_every_module_is_in_a_layer():
    for name in MODULES:
        layer(name)


def test_imports_go_down_or_sideways_only():
    wrong = upward_imports(MODULES)
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_no_import_cycle():
    assert not import_cycles(MODULES)


def test_every_quant_module_is_in_a_room():
    for name in quant_modules(MODULES):
        quant_room(name)


def test_quant_imports_go_down_or_sideways_only():
    wrong = quant_upward_imports(MODULES)
    assert not wrong, "upward imports inside hf_r2.quant:\n" + "\n".join(wrong)


def test_no_quant_family_imports_another():
    wrong = family_crossings(MODULES)
    assert not wrong, "a helper two families share belongs in the primitives' room:\n" + "\n".join(wrong)


def test_nothing_imports_the_command_line():
    graph = import_graph(MODULES)
    wrong = [f"{name} imports {target}" for name in MODULES if component(name) not in CLI
             for target in graph[name] if component(target) in CLI]
    assert not wrong, "\n".join(wrong)


def test_nothing_inside_imports_the_top_package():
    graph = import_graph(MODULES)
    wrong = [name for name in MODULES if name != "hf_r2" and "hf_r2" in graph[name]]
    assert not wrong, f"import the curated hf_r2/__init__.py (use hf_r2.version for __version__): {wrong}"


def test_no_private_name_crosses_modules():
    wrong = private_imports(MODULES)
    assert not wrong, "shared helpers belong in a private module under a public name:\n" + "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small_and_says_what_it_owns(name):
    source = MODULES[name].read_text(encoding="utf-8")
    lines = source.count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (at most {MAX_LINES}): split it by concern."
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring and docstring.strip(), f"{MODULES[name]} has no module docstring saying what it owns."


def test_the_checks_catch_what_they_forbid(tmp_path):
    """A fake package with an upward import, a cycle through a package __init__ and a private import trips them."""
    fake = tmp_path / "hf_r2"
    (fake / "quant").mkdir(parents=True)
    (fake / "__init__.py").write_text('"""x"""\n')
    (fake / "models.py").write_text('"""x"""\n\n\ndef f():\n    from .quant.a import thing\n')  # layer 1 -> 3
    (fake / "quant" / "__init__.py").write_text('"""x"""\nfrom .a import _helper\n')
    (fake / "quant" / "a.py").write_text('"""x"""\nfrom ..models import create_model\n')
    modules = find_modules(fake)
    assert upward_imports(modules) == ["hf_r2.models (layer 1) imports hf_r2.quant (layer 3)",
                                       "hf_r2.models (layer 1) imports hf_r2.quant.a (layer 3)"]
    assert import_cycles(modules) == [["hf_r2.models", "hf_r2.quant", "hf_r2.quant.a"]]
    assert private_imports(modules) == ["hf_r2.quant:2 takes _helper from hf_r2.quant.a"]


def test_the_quant_checks_catch_what_they_forbid(tmp_path):
    """A fake quant wing where a primitive imports a family and one family imports another trips them."""
    fake = tmp_path / "hf_r2"
    for folder in ("ptq", "cluster"):
        (fake / "quant" / folder).mkdir(parents=True)
        (fake / "quant" / folder / "__init__.py").write_text('"""x"""\n')
    (fake / "__init__.py").write_text('"""x"""\n')
    (fake / "quant" / "__init__.py").write_text('"""x"""\n')
    (fake / "quant" / "uniform.py").write_text('"""x"""\nfrom .ptq.a import thing\n')  # room 0 -> 1
    (fake / "quant" / "ptq" / "a.py").write_text('"""x"""\nfrom ..cluster.b import other\n')  # family -> family
    (fake / "quant" / "cluster" / "b.py").write_text('"""x"""\nfrom ..layers import y\n')
    (fake / "quant" / "layers.py").write_text('"""x"""\n')
    modules = find_modules(fake)
    assert quant_upward_imports(modules) == ["hf_r2.quant.uniform (room 0) imports hf_r2.quant.ptq (room 1)",
                                             "hf_r2.quant.uniform (room 0) imports hf_r2.quant.ptq.a (room 1)"]
    assert family_crossings(modules) == ["hf_r2.quant.ptq.a imports hf_r2.quant.cluster",
                                         "hf_r2.quant.ptq.a imports hf_r2.quant.cluster.b"]
    assert not import_cycles(modules)


def test_import_hf_r2_stays_light():
    """`import hf_r2` loads neither the low-bit toolkit nor the comparison nor the command line (a fresh process)."""
    import subprocess
    import sys

    code = ("import sys, hf_r2; print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('hf_r2.')}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for heavy in ("quant", "reproduce", "commands", "cli"):
        assert f"'{heavy}'" not in loaded, loaded
