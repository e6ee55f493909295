"""Which JSON codec for the wire: the standard library's ``json`` or ``orjson``.

Measures, in one process, the two operations the server does with JSON:

- **encode an event** once per event (shared by every recipient): a room
  message event as ``Event.to_wire()`` builds it, compact separators,
  UTF-8 output, non-ASCII kept as is;
- **decode a client frame** once per inbound message: a ``send`` command.

Each operation runs on three payload sizes (a short chat message, a
1 KiB message, a 16 KiB message with nested data), timed with
``time.perf_counter`` over many repetitions, median of 7 runs. Both codecs
must produce byte-identical output for the encode cases (checked), so the
choice cannot change what clients receive.

Run: ``python benchmarks/bench_json.py [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from _common import machine_info, markdown_table, write_json

try:
    import orjson
except ImportError:  # pragma: no cover - reported, not fatal
    orjson = None


def _event(content: str) -> dict[str, Any]:
    return {
        "type": "message",
        "topic": "room:general",
        "seq": 123456,
        "epoch": "5f0c2a9e",
        "data": {
            "id": "m-8c3f1e2a9b7d",
            "room_id": "general",
            "user_id": "alice",
            "display_name": "Alice Ünïcødé",
            "content": content,
            "message_type": "text",
            "timestamp": 1763856000.123456,
            "edited": False,
            "deleted": False,
            "seq": 123456,
            "epoch": "5f0c2a9e",
        },
    }


def payloads() -> dict[str, dict[str, Any]]:
    nested = _event("x" * 4096)
    nested["data"]["attachments"] = [{"name": f"file-{i}.png", "size": i * 1000, "tags": ["a", "b", "ç"]} for i in range(100)]
    return {
        "short (~300 B)": _event("hello, room"),
        "1 KiB": _event("é" * 350 + "a" * 300),
        "16 KiB nested": nested,
    }


def stdlib_encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def orjson_encode(value: Any) -> bytes:
    assert orjson is not None
    return orjson.dumps(value)


def time_per_call(fn: Callable[[Any], Any], arg: Any, repeat: int = 7) -> float:
    """Median µs per call."""
    # Calibrate: about 0.2 s per run.
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn(arg)
        elapsed = time.perf_counter() - start
        if elapsed > 0.2:
            break
        number *= 2
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn(arg)
        runs.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(runs)


def run() -> list[dict[str, Any]]:
    rows = []
    for name, value in payloads().items():
        encoded = stdlib_encode(value)
        if orjson is not None:
            assert orjson_encode(value) == encoded, f"the codecs disagree on {name}"
        command = json.dumps({"type": "send", "ref": 42, "room": "general", "content": value["data"]["content"]})
        row: dict[str, Any] = {"payload": name, "bytes": len(encoded)}
        row["encode_stdlib_us"] = time_per_call(stdlib_encode, value)
        row["decode_stdlib_us"] = time_per_call(json.loads, command)
        if orjson is not None:
            row["encode_orjson_us"] = time_per_call(orjson_encode, value)
            row["decode_orjson_us"] = time_per_call(orjson.loads, command)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    header = ("payload", "bytes", "encode json µs", "encode orjson µs", "speed-up", "decode json µs", "decode orjson µs", "speed-up")
    out = []
    for r in rows:
        enc_o = r.get("encode_orjson_us")
        dec_o = r.get("decode_orjson_us")
        out.append(
            (
                r["payload"],
                f"{r['bytes']:,}",
                f"{r['encode_stdlib_us']:.2f}",
                "-" if enc_o is None else f"{enc_o:.2f}",
                "-" if enc_o is None else f"{r['encode_stdlib_us'] / enc_o:.1f}x",
                f"{r['decode_stdlib_us']:.2f}",
                "-" if dec_o is None else f"{dec_o:.2f}",
                "-" if dec_o is None else f"{r['decode_stdlib_us'] / dec_o:.1f}x",
            )
        )
    return markdown_table(header, out, right=range(1, 8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    info = machine_info()
    if orjson is None:
        print("orjson is not installed: only the standard library is measured (pip install orjson)")
    info["orjson"] = None if orjson is None else orjson.__version__
    rows = run()
    print(table(rows))
    if args.json:
        write_json(args.json, {"machine": info, "command": "python benchmarks/bench_json.py", "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
