"""The wire's JSON codec (orjson with a standard-library fallback)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, strategies as st

from ensemble._json import JSONDecodeError, dumps, loads

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


@given(json_values)
def test_output_is_the_standard_librarys(value: Any) -> None:
    assert dumps(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    assert loads(dumps(value)) == value


def test_values_orjson_refuses_fall_back() -> None:
    assert dumps({"big": 2**70, 3: "x"}) == b'{"big":1180591620717411303424,"3":"x"}'
    assert dumps([float("nan"), float("inf")]) == b"[null,null]"


def test_default_and_refusals() -> None:
    def default(value: Any) -> Any:
        if isinstance(value, frozenset):
            return sorted(value)
        raise TypeError(f"cannot encode {type(value).__name__}")

    assert dumps({"s": frozenset({2, 1})}, default=default) == b'{"s":[1,2]}'
    with pytest.raises(TypeError, match="cannot encode object"):
        dumps({"o": object()}, default=default)
    with pytest.raises(TypeError):
        dumps({"o": object()})


def test_loads() -> None:
    assert loads(b'{"a":[1,2]}') == {"a": [1, 2]}
    assert loads('"é"') == "é"
    with pytest.raises(JSONDecodeError):
        loads(b"{nope")
    assert issubclass(JSONDecodeError, ValueError)
