"""The `cocofast` command: subcommands, their help, `python -m cocofast`, the declared entry point, packaging."""
from __future__ import annotations

import fnmatch
import importlib
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from cocofast.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_shows_its_own_help(name, capsys):
    try:
        code = main([name, "--help"])
    except SystemExit as done:  # argparse ends --help with SystemExit(0)
        code = done.code
    assert code == 0
    text = capsys.readouterr().out
    assert "usage" in text.lower() or "--config" in text, text[:300]


def test_models_lists_the_registered_networks(capsys):
    assert main(["models", "--sizes", "64", "--width", "0.125"]) == 0
    table = capsys.readouterr().out
    for name in ("fanet", "mobile_unet", "erfnet", "enet", "discriminator"):
        assert f"| {name} |" in table


def test_unknown_or_missing_subcommand_exits_2_with_the_choices(capsys):
    assert main(["segmnet"]) == 2
    err = capsys.readouterr().err
    assert "'segmnet'" in err and "did you mean 'segment'" in err and "predict" in err
    assert main([]) == 2
    assert main(["--help"]) == 0 and "experiments" in capsys.readouterr().out


def test_python_dash_m_cocofast_is_the_same_command():
    # One subprocess (importing cocofast costs seconds): a bad command's exit status and its list of commands.
    bad = subprocess.run([sys.executable, "-m", "cocofast", "nonsense"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown command 'nonsense'" in bad.stderr
    assert all(f"  {name} " in bad.stderr for name in COMMANDS)


def test_pyproject_declares_the_console_command():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["cocofast"].partition(":")
    assert getattr(importlib.import_module(module), function) is main


def test_setup_installs_every_subpackage(monkeypatch):
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    runpy.run_path(str(ROOT / "setup.py"))
    packages, package_dir = set(captured["packages"]), captured["package_dir"]
    expected = set()
    for package, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            expected.add(".".join([package, *init.parent.relative_to(ROOT / folder).parts]))
        for source in (ROOT / folder).rglob("*.py"):  # a folder of modules without __init__.py would be lost
            assert (source.parent / "__init__.py").is_file(), f"{source.parent} has modules but no __init__.py"
    assert {"cocofast.data", "cocofast.losses", "cocofast.models", "cocofast.kernels", "cocofast.train"} <= packages
    # A folder of data files alone is a package of its own, with patterns for its files: otherwise setuptools
    # warns that it would ignore the folder, and a later setuptools leaves its files out of the wheel.
    data = captured["package_data"]
    assert packages == expected | set(data)
    for config in (ROOT / "configs").rglob("*.yaml"):
        package = ".".join(["cocofast.configs", *config.parent.relative_to(ROOT / "configs").parts])
        assert any(fnmatch.fnmatch(config.name, pattern) for pattern in data.get(package, ())), \
            f"{config.relative_to(ROOT)} is not in package_data of {package}, so no install carries it"
