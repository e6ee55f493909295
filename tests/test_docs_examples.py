"""Every ```python block of the documentation is executed.

Conventions (for docs/actors.md, docs/embedding.md, README.md and any file added
to ``DOCUMENTS``):

* Each ```python block is a complete program: it imports and defines what
  it needs and, if it is async, calls ``trio.run(...)`` itself (a block must
  call ``trio.run`` or promise some output, see below, so that a block that
  only defines things fails). The test executes it with
  ``trio.run`` patched to run on ``trio.testing.MockClock(autojump_threshold=0)``,
  so sleeps, timers, backoff and grace periods in examples cost no wall time
  (keep them to a few seconds anyway: readers run them on the real clock).
* A ``print(...)`` line with a trailing comment states the output it
  produces: ``print(await counter.ask(3))  # 5`` expects the line ``5``. The
  text after ``#`` and one space is the exact line; the expected lines must
  appear in the block's output in that order (other output may come between).
* A block that defines top-level ``test_*`` functions is a pytest module
  instead: it is run by pytest in a subprocess (with ``trio_mode = true`` and
  the installed ``ensemble`` plugin), and all of its tests must pass.
"""

from __future__ import annotations

import ast
import io
import itertools
import linecache
import re
import tokenize
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "docs" / "actors.md", ROOT / "docs" / "embedding.md", ROOT / "README.md"]

FENCE = re.compile(r"^```[ \t]*(?P<lang>[^\s`]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

PYTEST_INI = """
[pytest]
trio_mode = true
filterwarnings = error
"""


@attrs.frozen
class Example:
    path: Path
    line: int  # of the opening fence, 1-based
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.line}"


def extract_blocks(text: str) -> list[tuple[str, int, str]]:
    """Every fenced block as ``(language, line of the fence, code)``."""
    return [(match["lang"], text.count("\n", 0, match.start()) + 1, match["code"]) for match in FENCE.finditer(text)]


def extract_python(path: Path) -> list[Example]:
    return [Example(path, line, code) for lang, line, code in extract_blocks(path.read_text(encoding="utf-8")) if lang == "python"]


def expected_output(code: str) -> list[str]:
    """The lines that ``print`` lines with a trailing comment promise."""
    tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    prints_on: set[int] = set()
    for token, following in itertools.pairwise(tokens):
        if token.type == tokenize.NAME and token.string == "print" and following.string == "(":
            prints_on.add(token.start[0])
    expected = []
    for token in tokens:
        if token.type == tokenize.COMMENT and token.start[0] in prints_on:
            text = token.string[1:]
            expected.append(text[1:] if text.startswith(" ") else text)
    return expected


def missing_in_order(expected: list[str], output: list[str]) -> list[str]:
    """The expected lines not found in ``output`` in order (empty: all found)."""
    remaining = iter(output)
    for index, line in enumerate(expected):
        if not any(candidate == line for candidate in remaining):
            return expected[index:]
    return []


def test_functions(code: str) -> list[str]:
    return [
        node.name
        for node in ast.parse(code).body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    ]


test_functions.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test

EXAMPLES = [example for path in DOCUMENTS for example in extract_python(path)]
PROGRAMS = [example for example in EXAMPLES if not test_functions(example.code)]
TEST_MODULES = [example for example in EXAMPLES if test_functions(example.code)]


# -- running the examples ---------------------------------------------------------------


def run_program(example: Example, monkeypatch: pytest.MonkeyPatch) -> int:
    """Execute a program block on the virtual clock; return how often it called trio.run."""
    calls = 0
    real_run: Callable[..., Any] = trio.run

    def run_on_virtual_clock(async_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        kwargs.setdefault("clock", trio.testing.MockClock(autojump_threshold=0))
        return real_run(async_fn, *args, **kwargs)

    monkeypatch.setattr(trio, "run", run_on_virtual_clock)
    filename = f"<{example.id}>"
    # Tracebacks show the example's source.
    linecache.cache[filename] = (len(example.code), None, example.code.splitlines(keepends=True), filename)
    try:
        exec(compile(example.code, filename, "exec"), {"__name__": "__example__"})
    finally:
        linecache.cache.pop(filename, None)
    return calls


@pytest.mark.parametrize("example", PROGRAMS, ids=lambda example: example.id)
def test_program_example(example: Example, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls = run_program(example, monkeypatch)
    output = capsys.readouterr().out.splitlines()
    expected = expected_output(example.code)
    assert calls >= 1 or expected, f"{example.id} neither calls trio.run nor promises any output"
    missing = missing_in_order(expected, output)
    assert not missing, f"{example.id}: expected {missing!r} (in order) in the output:\n" + "\n".join(output)


@pytest.mark.parametrize("example", TEST_MODULES, ids=lambda example: example.id)
def test_pytest_example(example: Example, pytester: pytest.Pytester) -> None:
    pytester.makeini(PYTEST_INI)
    pytester.makepyfile(test_example=example.code)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=len(test_functions(example.code)))


# -- what is collected ---------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.name)
def test_every_document_has_python_examples(path: Path) -> None:
    assert extract_python(path), f"no ```python block in {path}"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.name)
def test_no_python_block_escapes_the_convention(path: Path) -> None:
    """A block tagged ``py``, ``python3``, ``pycon`` ... would not be executed."""
    langs = {lang for lang, _, _ in extract_blocks(path.read_text(encoding="utf-8"))}
    assert {lang for lang in langs if lang.lower().startswith("py")} <= {"python"}


def test_examples_are_collected() -> None:
    assert len(EXAMPLES) == len(PROGRAMS) + len(TEST_MODULES)
    assert any(example.path.name == "README.md" for example in PROGRAMS)
    assert TEST_MODULES, "the pytest plugin example is missing"


# -- the helpers themselves -------------------------------------------------------------------


def test_extract_blocks() -> None:
    text = "intro\n```sh\nls\n```\n\n```python\nprint(1)  # 1\n```\n```python title\nx = 1\n```\n"
    assert extract_blocks(text) == [("sh", 2, "ls\n"), ("python", 6, "print(1)  # 1\n"), ("python", 9, "x = 1\n")]


def test_expected_output() -> None:
    code = (
        "x = 5  # not a print\n"
        "print(x)  # 5\n"
        "print('# not a comment')\n"
        "print(x, x)  #     indented\n"
        "print(x)  #no space\n"
        "def f(): pass  # print(x)  # no\n"
    )
    assert expected_output(code) == ["5", "    indented", "no space"]


def test_missing_in_order() -> None:
    assert missing_in_order(["a", "c"], ["a", "b", "c"]) == []
    assert missing_in_order(["c", "a"], ["a", "b", "c"]) == ["a"]
    assert missing_in_order(["x"], ["a"]) == ["x"]
    assert missing_in_order(["a"], ["a b"]) == ["a"]  # whole lines only


def test_a_wrong_promise_fails(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    example = Example(Path("fake.md"), 1, "import trio\n\nasync def main():\n    print(2 + 2)  # 5\n\ntrio.run(main)\n")
    with pytest.raises(AssertionError, match="expected"):
        test_program_example(example, monkeypatch, capsys)


def test_a_block_that_does_nothing_fails(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    example = Example(Path("fake.md"), 1, "import trio\n\nasync def main():\n    print(1)\n")
    with pytest.raises(AssertionError, match=r"neither calls trio\.run"):
        test_program_example(example, monkeypatch, capsys)


def test_examples_run_on_the_virtual_clock(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    example = Example(
        Path("fake.md"),
        1,
        "import trio\n\nasync def main():\n    await trio.sleep(3600)\n    print(trio.current_time())  # 3600.0\n\ntrio.run(main)\n",
    )
    test_program_example(example, monkeypatch, capsys)
