"""A quick sanity benchmark of the hypercorn transport: fan-out to many clients.

Starts ``python -m ensemble serve`` (development mode) in a subprocess on a
free loopback port, connects N WebSocket clients from W load-generator
processes (trio-websocket; each client joins room ``bench``), then one more
client publishes K messages of ~100 bytes as fast as the server answers
them. The run ends when every client has received every message. Reported:
deliveries/s (N x K over the wall time from the first publish to the last
delivery), server CPU µs per delivery (from ``/proc/<pid>/stat``), and the
generators' CPU, so a reader can see whether they were the bottleneck.

The full transport benchmarks (native transport, peers, latency, memory)
come with the native transport; this is the issue-4 sanity check.

Run: ``python benchmarks/bench_hypercorn.py [--clients 1000] [--messages 100] [--workers 2] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import trio
import trio_websocket
from _common import machine_info, write_json


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


async def _client(url: str, k: int, ready: trio.Semaphore, done: list[float], joined: trio.Event) -> None:
    async with trio_websocket.open_websocket_url(url, message_queue_size=4096) as ws:
        await ws.send_message(json.dumps({"type": "join", "ref": 1, "room": "bench"}))
        while True:
            frame = json.loads(await ws.get_message())
            if frame.get("ref") == 1:
                break
        ready.release()
        joined.set()
        got = 0
        while got < k:
            for line in (await ws.get_message()).split("\n"):
                frame = json.loads(line)
                if frame.get("type") == "message":
                    got += 1
                elif frame.get("type") == "ping":  # the server's heartbeat, as a real client answers it
                    await ws.send_message('{"type":"pong"}')
        done.append(time.perf_counter())


def generator(url: str, n: int, k: int, ready_queue: Any, result_queue: Any) -> None:
    """One load-generator process: n clients; reports readiness, then the finish time."""

    async def main() -> None:
        done: list[float] = []
        ready = trio.Semaphore(0)
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(_client, url, k, ready, done, trio.Event())
            for _ in range(n):
                await ready.acquire()
            ready_queue.put(n)
        cpu = time.process_time()
        result_queue.put({"last": max(done), "cpu": cpu, "clients": len(done)})

    trio.run(main)


async def publish(url: str, k: int, size: int) -> float:
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"type": "join", "ref": 0, "room": "bench"}))
        while json.loads(await ws.get_message()).get("ref") != 0:
            pass
        start = time.perf_counter()
        content = "x" * size
        for ref in range(1, k + 1):
            await ws.send_message(json.dumps({"type": "send", "ref": ref, "room": "bench", "content": content}))
            while json.loads(await ws.get_message()).get("ref") != ref:
                pass
        return start


def run(clients: int, messages: int, workers: int, size: int) -> dict[str, Any]:
    port = free_port()
    # One publisher sends as fast as it is answered: lift the per-user room
    # limit and the inbound rate limit, and size the outboxes for the burst.
    config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)  # noqa: SIM115 (removed below)
    config.write(
        f"""
[limits]
max_connections = {clients + 100}
max_connections_per_user = {clients + 100}

[heartbeat]
# The set-up storm (N joins, N² presence and member events) can keep a ping
# queued for longer than the default 20 + 20 s: this measures fan-out.
interval = 600
timeout = 600

[hub]
outbox_max_events = {messages + 1000}

[hub.room]
max_members = {clients + 100}
rate_limit = 1000000

[hub.rate_limit]
messages_per_second = 1000000
messages_per_minute = 1000000
burst_size = 1000000
"""
    )
    config.close()
    env = dict(os.environ)
    server = subprocess.Popen(
        [sys.executable, "-m", "ensemble", "serve", "--port", str(port), "--log-level", "warning", "--config", config.name],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.1)
        url = f"ws://127.0.0.1:{port}/ws"
        ready_queue: Any = multiprocessing.Queue()
        result_queue: Any = multiprocessing.Queue()
        per = [clients // workers + (1 if i < clients % workers else 0) for i in range(workers)]
        procs = [multiprocessing.Process(target=generator, args=(url, n, messages, ready_queue, result_queue)) for n in per]
        for p in procs:
            p.start()
        for _ in procs:
            ready_queue.get(timeout=900)
        # The joins' presence and member_joined events (N² frames) may still
        # be on their way: start only once the server has gone quiet.
        idle = cpu_seconds(server.pid)
        while True:
            time.sleep(0.5)
            now = cpu_seconds(server.pid)
            if now - idle < 0.02:
                break
            idle = now
        cpu_before = cpu_seconds(server.pid)
        start = trio.run(publish, url, messages, size)
        results = [result_queue.get(timeout=900) for _ in procs]
        cpu_after = cpu_seconds(server.pid)
        for p in procs:
            p.join(timeout=30)
        end = max(r["last"] for r in results)
        deliveries = clients * messages
        wall = end - start
        return {
            "clients": clients,
            "messages": messages,
            "payload_bytes": size,
            "workers": workers,
            "deliveries": deliveries,
            "wall_s": wall,
            "deliveries_per_s": deliveries / wall,
            "server_cpu_s": cpu_after - cpu_before,
            "server_us_per_delivery": (cpu_after - cpu_before) / deliveries * 1e6,
            "generator_cpu_s": [r["cpu"] for r in results],
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
        os.unlink(config.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=100, help="message content bytes")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    info = machine_info()
    result = run(args.clients, args.messages, args.workers, args.size)
    print(
        f"{result['clients']} clients x {result['messages']} messages: {result['deliveries_per_s']:,.0f} deliveries/s, "
        f"server {result['server_us_per_delivery']:.2f} µs CPU/delivery, wall {result['wall_s']:.2f} s, "
        f"generators' CPU {', '.join(f'{c:.1f} s' for c in result['generator_cpu_s'])}"
    )
    if args.json:
        write_json(args.json, {"machine": info, "command": "python benchmarks/bench_hypercorn.py", "results": [result]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
