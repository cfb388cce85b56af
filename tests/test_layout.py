"""The tree keeps its own rules: no module imports another module's private name, imports flow one way."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kernels": "cocofast.kernels", "cocofast": "cocofast", "train": "cocofast.train"}


def python_files():
    for folder in ("cocofast", "kernels", "train", "bench", "tests"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


LOCAL = {"common", "reference", "conftest", "helpers"}  # bench/ and tests/ helpers imported by file name


def ours(module: str, level: int) -> bool:
    """cocofast's own modules (torch's documented hooks such as torch.utils._python_dispatch are not ours)."""
    return level > 0 or module.split(".")[0] in {"cocofast", *LOCAL}


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and ours(node.module or "", node.level):
            for alias in node.names:
                yield node.lineno, node.module or "", alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if ours(alias.name, 0):
                    yield node.lineno, alias.name, None


def test_no_module_imports_a_private_name_from_another():
    found = []
    for path in python_files():
        for line, module, name in imports(path):
            parts = module.split(".") + ([name] if name else [])
            if any(private(p) for p in parts if p):
                found.append(f"{path.relative_to(ROOT)}:{line}: {module} {name or ''}".strip())
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_the_checker_sees_a_private_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from cocofast.ops.similarity import _check_pair\nimport cocofast.kernels._launch\n")
    names = [(m, n) for _, m, n in imports(sample)]
    assert [p for m, n in names for p in (m.split(".") + ([n] if n else [])) if private(p)] == \
        ["_check_pair", "_launch"]


def test_imports_flow_one_way():
    """kernels import nothing of cocofast or train; cocofast imports nothing of train (its CLI entry point,
    cocofast/cli.py, reaches the training program by name at run time and is the one exception)."""
    found = []
    for folder, forbidden in (("kernels", ("cocofast.train", "cocofast.losses", "cocofast.models",
                                           "cocofast.data", "cocofast.ops")),
                              ("cocofast", ("cocofast.train",))):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "cli.py":
                continue
            for line, module, _ in imports(path):
                if module.startswith(forbidden):
                    found.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not found, "\n".join(found)


def module_name(path: Path) -> str:
    """The import name a source file installs as (kernels/gram.py -> cocofast.kernels.gram)."""
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def absolute_imports(path: Path, package: str):
    """(line, module, name) for every import in the file, ours or not, relative ones resolved against
    `package`: `from pkg import name` gives (line, "pkg", "name"), where name may be a module; `import m`
    gives (line, "m", None)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                yield node.lineno, base, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None


def package_of(path: Path) -> str:
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def import_graph(files) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, anywhere in the file (a function-local import still binds
    the two modules together: one cannot be read, moved or tested without the other)."""
    modules = {module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for _, base, alias in absolute_imports(path, package_of(path)):
            target = f"{base}.{alias}" if alias else base  # `from pkg import mod` imports the module pkg.mod
            edges.add(target if target in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def test_no_import_circles():
    files = [p for folder in PACKAGES for p in sorted((ROOT / folder).rglob("*.py"))]
    found = circles(import_graph(files))
    assert not found, "modules that import each other (directly or round a loop):\n" + \
        "\n".join(" <-> ".join(group) for group in found)


def test_the_circle_finder_sees_a_loop_through_three_modules(tmp_path, monkeypatch):
    package = tmp_path / "train"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import x\n")
    (package / "b.py").write_text("def f():\n    from cocofast.train.c import y\n")
    (package / "c.py").write_text("from . import a\n")
    (package / "d.py").write_text("from .a import z\n")  # imports into the loop, is not part of it
    monkeypatch.setitem(globals(), "ROOT", tmp_path)  # module_name() reads the tree root
    graph = import_graph(sorted(package.glob("*.py")))
    assert circles(graph) == [["cocofast.train.a", "cocofast.train.b", "cocofast.train.c"]]


def forbidden_imports(files, forbidden: tuple[str, ...]) -> list[str]:
    """'file:line: imports module' for each import of a module under one of `forbidden`."""
    found = []
    for path in files:
        for line, base, alias in absolute_imports(path, package_of(path)):
            module = f"{base}.{alias}" if alias else base
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    return sorted(set(found))


PERF = "cocofast.perf"
# What compiling for a GPU needs, and the kernels must not: they run the same on a machine without a compiler.
COMPILE_TOOLING = (PERF, "triton.compiler", "triton.backends.nvidia", "triton.tools", "subprocess")


def test_runtime_code_does_not_import_the_measurement_tools():
    """cocofast.perf (traffic counts, the compile guard, roofline reports) is for tests and bench only."""
    runtime = [p for folder in PACKAGES for p in sorted((ROOT / folder).rglob("*.py"))
               if not module_name(p).startswith(PERF)]
    assert not forbidden_imports(runtime, (PERF,))


def test_kernel_files_import_no_compile_tooling():
    assert not forbidden_imports(sorted((ROOT / "kernels").rglob("*.py")), COMPILE_TOOLING)


def test_the_import_checks_see_a_forbidden_import(tmp_path, monkeypatch):
    package = tmp_path / "kernels"
    package.mkdir()
    (package / "gram.py").write_text("def f():\n    from ..perf import traffic\n")  # ..: cocofast
    (package / "tiled.py").write_text("import subprocess\nfrom triton.compiler import ASTSource\n")
    (package / "launcher.py").write_text("import triton\nfrom triton.runtime.jit import JITFunction\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    found = forbidden_imports(sorted(package.glob("*.py")), COMPILE_TOOLING)
    assert [f.split(": imports ")[1] for f in found] == \
        ["cocofast.perf.traffic", "subprocess", "triton.compiler.ASTSource"]

