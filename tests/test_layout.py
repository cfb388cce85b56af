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
    sample.write_text("from cocofast.similarity import _check_pair\nimport cocofast.kernels._launch\n")
    names = [(m, n) for _, m, n in imports(sample)]
    assert [p for m, n in names for p in (m.split(".") + ([n] if n else [])) if private(p)] == \
        ["_check_pair", "_launch"]


def test_imports_flow_one_way():
    """kernels import nothing of cocofast or train; cocofast imports nothing of train (its CLI entry point,
    cocofast/cli.py, reaches the training program by name at run time and is the one exception)."""
    found = []
    for folder, forbidden in (("kernels", ("cocofast.train", "cocofast.losses", "cocofast.models",
                                           "cocofast.data", "cocofast.similarity")),
                              ("cocofast", ("cocofast.train",))):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "cli.py":
                continue
            for line, module, _ in imports(path):
                if module.startswith(forbidden):
                    found.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not found, "\n".join(found)
