"""Imports point down (DESIGN.md decision 11): no module imports one that imports it back, and only jaxvlm installs."""
import ast
import importlib
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Module prefix -> folder. Their own __init__ modules are left out: the top level may re-export anything.
ROOTS = {"jaxvlm": REPO / "jaxvlm", "jaxvlm.converters": REPO / "converters"}


def find_modules(roots):
    """{module name: (path, is_package)} for every .py file under the roots."""
    modules = {}
    for prefix, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            modules[".".join((prefix, *(parts[:-1] if is_package else parts)))] = (path, is_package)
    return modules


def is_type_checking(test):
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def import_statements(node):
    """Every Import/ImportFrom below `node`, in functions and classes too, skipping `if TYPE_CHECKING:` bodies."""
    children = node.orelse if isinstance(node, ast.If) and is_type_checking(node.test) else ast.iter_child_nodes(node)
    for child in children:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        else:
            yield from import_statements(child)


def imported_modules(stmt, name, is_package, modules):
    """The module names `stmt` (in module `name`) imports: `from pkg import sub` means pkg.sub if it is a file."""
    if isinstance(stmt, ast.Import):
        return [alias.name for alias in stmt.names]
    base = stmt.module or ""
    if stmt.level:
        package = name.split(".") if is_package else name.split(".")[:-1]
        base = ".".join(package[:len(package) - stmt.level + 1] + ([stmt.module] if stmt.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in stmt.names]


def import_graph(roots):
    """{module: {imported module: ["file:line", ...]}} over the repo's modules, roots' __init__ left out."""
    modules = find_modules(roots)
    graph = {name: {} for name in modules if name not in roots}
    for name in graph:
        path, is_package = modules[name]
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        for stmt in import_statements(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{stmt.lineno}"
            for target in imported_modules(stmt, name, is_package, modules):
                parts = target.split(".")
                # Importing a.b.c runs a.b's __init__ too, unless the importer is inside a.b (already running).
                parents = {".".join(parts[:i]) for i in range(1, len(parts))} - own_packages
                for dest in (parents | {target}) & graph.keys():
                    graph[name].setdefault(dest, []).append(where)
    return graph


def reachable(graph, start):
    """Modules reachable from `start` by one or more edges (so `start` is in it only if it is on a cycle)."""
    seen, stack = set(), list(graph[start])
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(graph[node])
    return seen


def cycles(graph):
    """The strongly connected components that hold a cycle, each a sorted list of modules."""
    reach = {name: reachable(graph, name) for name in graph}
    components, done = [], set()
    for name in sorted(graph):
        if name in reach[name] and name not in done:
            components.append(sorted(other for other in reach[name] if name in reach[other]))
            done.update(components[-1])
    return components


def describe(graph, component):
    edges = [f"    {src} -> {dst}  ({', '.join(graph[src][dst])})"
             for src in component for dst in component if dst in graph[src]]
    return "cycle through " + ", ".join(component) + ":\n" + "\n".join(edges)


def test_no_import_cycles():
    graph = import_graph(ROOTS)
    found = cycles(graph)
    assert not found, "imports must point down; break these cycles:\n" + "\n".join(describe(graph, c) for c in found)


# The layers of DESIGN.md decision 11, bottom first: a module may import its own layer and those below.
LAYERS = [
    ("weights and kernels", ("jaxvlm.quant", "jaxvlm.kernels", "jaxvlm.layers", "jaxvlm.paths")),
    ("model families", ("jaxvlm.models",)),
    ("param-tree transforms", ("jaxvlm.lora", "jaxvlm.targets", "jaxvlm.quantize", "jaxvlm.sharding")),
    ("converters", ("jaxvlm.converters",)),
    ("user API, trainer and tools", ("jaxvlm.fast_vision_model", "jaxvlm.generate", "jaxvlm.engine", "jaxvlm.export",
                                     "jaxvlm.processing", "jaxvlm.video", "jaxvlm.tiny", "jaxvlm.train", "jaxvlm.cli")),
]


def layer_of(module):
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer of LAYERS: place it there")


def test_imports_point_down():
    graph = import_graph(ROOTS)
    upward = [f"    {src} ({LAYERS[layer_of(src)][0]}) -> {dst} ({LAYERS[layer_of(dst)][0]})  ({', '.join(where)})"
              for src, targets in graph.items() for dst, where in targets.items() if layer_of(dst) > layer_of(src)]
    assert not upward, "imports must point down the layers:\n" + "\n".join(upward)


def test_no_family_leaks_into_shared_modules():
    """Outside jaxvlm/models/, code reaches a family only through the registry and the base class."""
    graph = import_graph(ROOTS)
    leaks = [f"    {src} -> {dst}  ({', '.join(where)})" for src, targets in graph.items() for dst, where in targets.items()
             if not src.startswith("jaxvlm.models") and dst.startswith("jaxvlm.models.")
             and dst != "jaxvlm.models.base"]
    assert not leaks, "a family module imported outside jaxvlm/models/:\n" + "\n".join(leaks)


def test_cycle_finder_sees_function_imports_and_skips_type_checking(tmp_path):
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from . import b\n",
        "b.py": "class B:\n    from pkg.a import f\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n",
        "d.py": "import pkg.c\n",
        # A package __init__ re-exporting its modules is no cycle: x runs after pkg.sub has started.
        "sub/__init__.py": "from pkg.sub import x\n",
        "sub/x.py": "from pkg.sub.y import z\n",
        "sub/y.py": "z = 1\n",
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    graph = import_graph({"pkg": tmp_path / "pkg"})
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
    assert graph["pkg.a"]["pkg.b"] == [f"{tmp_path / 'pkg' / 'a.py'}:2"]
    assert "cycle through pkg.a, pkg.b" in describe(graph, ["pkg.a", "pkg.b"])


def test_installed_packages_are_jaxvlm_only():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, package_dir = setuptools["packages"], setuptools.get("package-dir", {})
    # scripts/ and converters/ must not install as top-level packages.
    assert all(p == "jaxvlm" or p.startswith("jaxvlm.") for p in packages), packages

    def folder(package):
        for prefix in sorted(package_dir, key=len, reverse=True):
            if package == prefix or package.startswith(prefix + "."):
                return REPO / package_dir[prefix] / Path(*package[len(prefix):].split(".")[1:])
        return REPO / Path(*package.split("."))

    listed = {folder(p) for p in packages}
    on_disk = {init.parent for root in ROOTS.values() for init in root.rglob("__init__.py")}
    assert on_disk - listed == set(), f"missing from [tool.setuptools] packages: {on_disk - listed}"
    assert listed - on_disk == set(), f"listed packages with no __init__.py: {listed - on_disk}"


def test_console_scripts_are_cli_mains():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for command, target in scripts.items():
        module, _, attr = target.partition(":")
        assert module.startswith("jaxvlm.cli.") and attr == "main", f"{command} = {target!r}: expected jaxvlm.cli.*:main"
        assert callable(getattr(importlib.import_module(module), attr)), f"{command}: {target} not callable"
