"""``ensemble/protocol`` is sans-IO: it imports the standard library and attrs only (no trio)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_layering import PACKAGE_ROOT, imported_modules, imports_of, is_within

PROTOCOL = PACKAGE_ROOT / "protocol"


def protocol_sources() -> list[Path]:
    paths = sorted(PROTOCOL.rglob("*.py"))
    assert paths, f"no modules under {PROTOCOL}"
    return paths


@pytest.mark.parametrize("path", protocol_sources(), ids=lambda p: p.name)
def test_protocol_imports_the_standard_library_and_attrs_only(path: Path) -> None:
    for name in imports_of(path):
        top = name.partition(".")[0]
        if top == "ensemble":
            assert is_within(name, "ensemble.protocol"), f"{path} imports {name}"
        else:
            assert top == "attrs" or top in sys.stdlib_module_names or top == "__future__", f"{path} imports {name}"


def test_the_protocol_package_has_its_modules() -> None:
    assert {"__init__.py", "_close.py", "_codec.py", "_commands.py"} <= {path.name for path in protocol_sources()}


def test_the_check_would_catch_trio() -> None:
    found = imported_modules("import trio\nfrom trio import lowlevel", "ensemble.protocol._codec")
    assert "trio" in found
    assert "trio" not in sys.stdlib_module_names
