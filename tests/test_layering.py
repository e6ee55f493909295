"""Layering rules of docs/design.md, checked on the source with ``ast``.

``ensemble/actors/`` depends on trio and attrs only: it never imports
``ensemble.transport`` or ``ensemble.testing`` (absolute or relative, at run
time or under ``TYPE_CHECKING``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "ensemble"
ACTORS = PACKAGE_ROOT / "actors"
THIRD_PARTY_ALLOWED = {"trio", "attrs"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module a source file imports, as absolute dotted names.

    ``from X import y`` yields both ``X`` and ``X.y`` (``y`` may be a
    submodule), with relative imports resolved against ``module``.
    Calls of ``importlib.import_module``/``__import__`` with a literal name
    count too.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"relative import beyond the top level in {module}")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                assert node.module is not None
                base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if name in {"import_module", "__import__"} and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def is_within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def actors_sources() -> list[Path]:
    paths = sorted(ACTORS.rglob("*.py"))
    assert paths, f"no modules under {ACTORS}"
    return paths


def imports_of(path: Path) -> set[str]:
    return imported_modules(path.read_text(encoding="utf-8"), module_name(path), is_package=path.name == "__init__.py")


@pytest.mark.parametrize("path", actors_sources(), ids=lambda p: p.name)
def test_actors_never_import_transport(path: Path) -> None:
    bad = {name for name in imports_of(path) if is_within(name, "ensemble.transport")}
    assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize("path", actors_sources(), ids=lambda p: p.name)
def test_actors_never_import_testing(path: Path) -> None:
    bad = {name for name in imports_of(path) if is_within(name, "ensemble.testing")}
    assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize("path", actors_sources(), ids=lambda p: p.name)
def test_actors_depend_on_trio_attrs_and_the_standard_library_only(path: Path) -> None:
    for name in imports_of(path):
        top = name.partition(".")[0]
        if top == "ensemble":
            assert is_within(name, "ensemble.actors"), f"{path} imports {name}"
        else:
            assert top in THIRD_PARTY_ALLOWED or top in sys.stdlib_module_names or top == "__future__", f"{path} imports {name}"


def test_the_actors_package_has_its_modules() -> None:
    names = {path.name for path in actors_sources()}
    assert {"__init__.py", "_actor.py", "_mailbox.py", "_supervisor.py", "_errors.py"} <= names


# -- the checker itself catches every form of import ------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "import ensemble.transport",
        "import ensemble.transport.codec as codec",
        "from ensemble.transport import codec",
        "from ensemble import transport",
        "from .. import transport",
        "from ..transport import codec",
        "from ..transport.codec import decode",
        "if TYPE_CHECKING:\n    from ..transport import Thing",
        "def f():\n    from ..transport import x",
        "importlib.import_module('ensemble.transport')",
        "__import__('ensemble.transport.codec')",
    ],
)
def test_the_checker_finds_transport_imports(source: str) -> None:
    found = imported_modules(source, "ensemble.actors._actor")
    assert any(is_within(name, "ensemble.transport") for name in found), found


@pytest.mark.parametrize(
    "source",
    [
        "import trio",
        "from ._mailbox import Mailbox",
        "from . import _errors",
        "from ensemble.actors import Actor",
        "import ensemble_transport",
        "from ..transporter import x",
    ],
)
def test_the_checker_allows_other_imports(source: str) -> None:
    found = imported_modules(source, "ensemble.actors._actor")
    assert not any(is_within(name, "ensemble.transport") for name in found), found


def test_relative_imports_resolve_in_a_package_init() -> None:
    assert "ensemble.transport" in imported_modules("from ..transport import x", "ensemble.actors", is_package=True)
    assert "ensemble.actors._actor" in imported_modules("from ._actor import Actor", "ensemble.actors", is_package=True)
    assert "ensemble.testing" in imported_modules("from .. import testing", "ensemble.actors", is_package=True)


def test_a_relative_import_above_the_top_level_is_an_error() -> None:
    with pytest.raises(ValueError, match="beyond the top level"):
        imported_modules("from ... import ensemble", "ensemble.actors._actor")
