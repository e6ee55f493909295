"""The sans-IO codec: every command decodes, every bad frame is one ProtocolError."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from ensemble import protocol as p
from ensemble.protocol import ProtocolError, decode, encode_error, encode_pong, encode_reply, encode_welcome

POSITION = {"epoch": "e1", "seq": 3}

EXAMPLES: list[tuple[dict[str, Any], Any]] = [
    ({"type": "auth", "token": "t"}, p.Auth(token="t")),
    ({"type": "auth", "token": "t", "since": POSITION}, p.Auth(token="t", since=p.Position(epoch="e1", seq=3))),
    ({"type": "ping"}, p.Ping()),
    ({"type": "pong"}, p.Pong()),
    ({"type": "options", "batch": True}, p.Options(batch=True)),
    ({"type": "join", "room": "general"}, p.Join(room="general")),
    (
        {"type": "join", "room": "general", "display_name": "Al", "since": POSITION},
        p.Join(room="general", display_name="Al", since=p.Position(epoch="e1", seq=3)),
    ),
    ({"type": "leave", "room": "general"}, p.Leave(room="general")),
    ({"type": "leave", "room": "general", "membership": True}, p.Leave(room="general", membership=True)),
    ({"type": "send", "room": "r", "content": "hi"}, p.Send(room="r", content="hi")),
    ({"type": "send", "room": "r", "content": "", "message_type": "image"}, p.Send(room="r", content="", message_type="image")),
    ({"type": "edit", "room": "r", "message_id": "m", "content": "x"}, p.Edit(room="r", message_id="m", content="x")),
    ({"type": "delete", "room": "r", "message_id": "m"}, p.Delete(room="r", message_id="m")),
    ({"type": "typing", "room": "r"}, p.Typing(room="r", typing=True)),
    ({"type": "typing", "room": "r", "typing": False}, p.Typing(room="r", typing=False)),
    ({"type": "history", "room": "r"}, p.History(room="r", limit=50)),
    ({"type": "history", "room": "r", "limit": 5, "since": POSITION}, p.History(room="r", limit=5, since=p.Position(epoch="e1", seq=3))),
    ({"type": "members", "room": "r"}, p.Members(room="r")),
    ({"type": "kick", "room": "r", "user": "u", "reason": "spam"}, p.Kick(room="r", user="u", reason="spam")),
    ({"type": "ban", "room": "r", "user": "u"}, p.Ban(room="r", user="u")),
    ({"type": "unban", "room": "r", "user": "u"}, p.Unban(room="r", user="u")),
    ({"type": "set_role", "room": "r", "user": "u", "role": "moderator"}, p.SetRole(room="r", user="u", role="moderator")),
    ({"type": "request_join", "room": "r"}, p.RequestJoin(room="r")),
    ({"type": "approve", "room": "r", "user": "u"}, p.Approve(room="r", user="u")),
    ({"type": "deny", "room": "r", "user": "u", "reason": "no"}, p.Deny(room="r", user="u", reason="no")),
    ({"type": "join_requests", "room": "r"}, p.JoinRequests(room="r")),
    ({"type": "notifications"}, p.Notifications()),
    ({"type": "notifications", "unread_only": True, "limit": 3}, p.Notifications(unread_only=True, limit=3)),
    ({"type": "unread"}, p.Unread()),
    ({"type": "mark_read", "id": "n1"}, p.MarkRead(id="n1")),
    ({"type": "mark_all_read"}, p.MarkAllRead()),
    ({"type": "clear"}, p.Clear()),
    ({"type": "watch", "model": "Order"}, p.Watch(model="Order")),
    (
        {"type": "watch", "model": "Order", "filters": {"status": "open", "n": 1, "ok": True, "x": None}, "since": 4, "epoch": "e"},
        p.Watch(model="Order", filters={"status": "open", "n": 1, "ok": True, "x": None}, since=4, epoch="e"),
    ),
    ({"type": "unwatch", "id": "w1"}, p.Unwatch(id="w1")),
]


def test_every_command_type_has_an_example() -> None:
    assert {frame["type"] for frame, _ in EXAMPLES} == set(p.COMMAND_TYPES)


@pytest.mark.parametrize(("frame", "expected"), EXAMPLES, ids=lambda x: x["type"] if isinstance(x, dict) else "")
def test_decode_every_command(frame: dict[str, Any], expected: Any) -> None:
    text = json.dumps(frame)
    assert decode(text) == expected
    assert decode(text.encode()) == expected
    assert decode(json.dumps({**frame, "ref": 7})).ref == 7
    assert decode(json.dumps({**frame, "ref": "abc"})).ref == "abc"
    assert decode(json.dumps({**frame, "unknown_field": [1, 2]})) == expected  # ignored


def test_a_bare_token_is_auth_with_the_seeds_shape() -> None:
    assert decode('{"token":"eyJ"}') == p.Auth(token="eyJ")
    assert decode('{"token":"eyJ","ref":2}') == p.Auth(token="eyJ", ref=2)


def test_a_client_cannot_choose_its_role_on_join() -> None:
    command = decode('{"type":"join","room":"r","role":"admin"}')
    assert command == p.Join(room="r")
    assert not hasattr(command, "role")


def error(frame: Any, **options: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(frame, **options)
    return info.value


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("", "bad_json"),
        ("{", "bad_json"),
        ("nul", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        ('{"a":1,"a":2}', "bad_json"),
        ("1" * 5000, "bad_json"),
        ("[]", "bad_frame"),
        ('"text"', "bad_frame"),
        ("42", "bad_frame"),
        ("null", "bad_frame"),
        ('{"type":"nope"}', "unknown_command"),
        ('{"type":"reply"}', "unknown_command"),
        ("{}", "invalid"),
        ('{"type":1}', "invalid"),
        ('{"type":"join"}', "invalid"),
        ('{"type":"join","room":""}', "invalid"),
        ('{"type":"join","room":"a/b"}', "invalid"),
        ('{"type":"join","room":null}', "invalid"),
        ('{"type":"join","room":["general"]}', "invalid"),
        ('{"type":"join","room":"' + "r" * 201 + '"}', "invalid"),
        ('{"type":"join","room":"r","since":{"epoch":"e"}}', "invalid"),
        ('{"type":"join","room":"r","since":{"epoch":"e","seq":-1}}', "invalid"),
        ('{"type":"join","room":"r","since":{"epoch":"e","seq":1.5}}', "invalid"),
        ('{"type":"join","room":"r","since":{"epoch":"e","seq":true}}', "invalid"),
        ('{"type":"join","room":"r","since":{"epoch":"e","seq":1,"x":1}}', "invalid"),
        ('{"type":"join","room":"r","since":[1]}', "invalid"),
        ('{"type":"send","room":"r","content":5}', "invalid"),
        ('{"type":"send","room":"r","content":"\\ud800"}', "invalid"),
        ('{"type":"typing","room":"r","typing":"yes"}', "invalid"),
        ('{"type":"history","room":"r","limit":0}', "invalid"),
        ('{"type":"history","room":"r","limit":1001}', "invalid"),
        ('{"type":"watch","model":"M","filters":{"a":[1]}}', "invalid"),
        ('{"type":"watch","model":"M","filters":[1]}', "invalid"),
        ('{"type":"watch","model":"M","since":-1}', "invalid"),
        ('{"type":"ping","x":NaN}', "invalid"),
        ('{"type":"ping","x":Infinity}', "invalid"),
        ('{"type":"ping","x":1e999}', "invalid"),
        ('{"type":"ping","ref":true}', "invalid"),
        ('{"type":"ping","ref":1.5}', "invalid"),
        ('{"type":"ping","ref":{"a":1}}', "invalid"),
        ('{"type":"ping","ref":9007199254740993}', "invalid"),
        ("[" * 33 + "]" * 33, "too_deep"),
        ('{"type":"ping","x":' + "[" * 40 + "]" * 40 + "}", "too_deep"),
    ],
)
def test_bad_frames(frame: str | bytes, code: str) -> None:
    exc = error(frame)
    assert exc.code == code, exc
    assert exc.code in p.DECODE_ERRORS
    assert exc.detail


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    content = "[" * 100 + '\\"{' * 50
    assert decode('{"type":"send","room":"r","content":"' + content + '"}').content == "[" * 100 + '"{' * 50  # type: ignore[union-attr]


def test_max_depth_is_the_limit() -> None:
    nested = "[" * 31 + "]" * 31
    decode('{"type":"ping","x":' + nested + "}")  # 32 levels with the object
    assert error('{"type":"ping","x":[' + nested + "]}").code == "too_deep"
    assert error('{"type":"ping","x":[1]}', max_depth=1).code == "too_deep"


def test_size_is_checked_before_parsing() -> None:
    frame = '{"type":"send","room":"r","content":"' + "x" * 100 + '"}'
    assert error(frame, max_size=100).code == "too_big"
    assert error(frame.encode(), max_size=100).code == "too_big"
    assert decode(frame, max_size=len(frame)).content == "x" * 100  # type: ignore[union-attr]
    # Characters are counted as UTF-8 bytes.
    wide = '{"type":"send","room":"r","content":"' + "é" * 40 + '"}'
    assert len(wide) < 100 < len(wide.encode())
    assert error(wide, max_size=100).code == "too_big"
    assert error("x" * 200, max_size=100).code == "too_big"  # not even JSON: size first


def test_the_ref_is_reported_when_it_could_be_read() -> None:
    assert error('{"type":"nope","ref":5}').ref == 5
    assert error('{"type":"join","ref":"a"}').ref == "a"
    assert error('{"type":"join","room":"","ref":3}').ref == 3
    assert error('{"type":"ping","ref":true}').ref is None
    assert error("[1]").ref is None


def test_non_text_input_is_a_protocol_error() -> None:
    assert error(123).code == "bad_frame"  # type: ignore[arg-type]
    assert error(None).code == "bad_frame"  # type: ignore[arg-type]


def test_encoders() -> None:
    assert encode_reply(1, {"a": "é"}) == '{"type":"reply","ref":1,"ok":true,"data":{"a":"é"}}'.encode()
    assert encode_reply("x", None) == b'{"type":"reply","ref":"x","ok":true,"data":{}}'
    assert encode_error("bad_json", "nope") == b'{"type":"error","code":"bad_json","detail":"nope"}'
    assert encode_error("rate_limited", "slow", 4, retry_after=0.5) == (
        b'{"type":"error","ref":4,"code":"rate_limited","detail":"slow","retry_after":0.5}'
    )
    assert encode_pong() == b'{"type":"pong"}'
    assert encode_pong(3) == b'{"type":"pong","ref":3}'
    welcome = json.loads(encode_welcome(connection_id="c", user_id="u", notifications={"epoch": "e", "last_seq": 0}, protocol=1))
    assert welcome == {
        "type": "welcome",
        "connection_id": "c",
        "user_id": "u",
        "guest": False,
        "notifications": {"epoch": "e", "last_seq": 0},
        "protocol": 1,
    }
    assert ProtocolError("invalid", "x", 9).to_frame() == b'{"type":"error","ref":9,"code":"invalid","detail":"x"}'


def test_encoding_never_breaks_on_a_lone_surrogate() -> None:
    frame = encode_reply(1, {"s": "\ud800"})
    assert json.loads(frame)["data"]["s"] == "\ud800"
    frame.decode("utf-8")


def test_encoding_refuses_nan() -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        encode_reply(1, {"x": math.nan})


# -- property: nothing but ProtocolError ----------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)

command_like = st.fixed_dictionaries(
    {"type": st.sampled_from([*p.COMMAND_TYPES, "nope", ""]) | json_values},
    optional={
        "ref": json_values,
        "room": st.text(max_size=5) | json_values,
        "user": json_values,
        "content": json_values,
        "token": json_values,
        "since": st.fixed_dictionaries({"epoch": json_values, "seq": json_values}) | json_values,
        "filters": json_values,
        "limit": json_values,
        "typing": json_values,
        "batch": json_values,
        "model": json_values,
        "id": json_values,
    },
)


def check(frame: Any) -> None:
    try:
        command = decode(frame, max_size=4096, max_depth=8)
    except ProtocolError as exc:
        error = exc
    else:
        assert command.type in p.COMMAND_TYPES
        return
    assert error.code in p.DECODE_ERRORS
    assert isinstance(error.detail, str)
    assert error.ref is None or isinstance(error.ref, (str, int))
    error.to_frame().decode("utf-8")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_no_text_raises_anything_else(frame: str) -> None:
    check(frame)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_no_bytes_raise_anything_else(frame: bytes) -> None:
    check(frame)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_no_json_value_raises_anything_else(value: Any) -> None:
    check(json.dumps(value))


@settings(max_examples=500, deadline=None)
@given(command_like)
def test_no_command_shaped_frame_raises_anything_else(value: Any) -> None:
    check(json.dumps(value))
    check(json.dumps(value).encode())


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='[]{}"\\,:1a ', max_size=300))
def test_no_bracket_soup_raises_anything_else(frame: str) -> None:
    check(frame)
