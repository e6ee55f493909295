"""The transport benchmarks in one command: Ensemble's transports against the peer servers.

Every server runs in its own process on a free loopback port and is started
fresh for every load-generator run (so no memory or state carries over from
one measurement to the next), then stopped with SIGTERM (SIGKILL after a
timeout). The load comes from ``benchmarks/loadgen.py``, run as a subprocess
with ``--json`` and ``--server-pid`` (its raw reports are kept in the JSON).

Servers (``--servers``):

* ``native``, ``hypercorn``: Ensemble (``python -m ensemble serve --transport
  native|hypercorn``, development mode) with a TOML that lifts the limits a
  benchmark would otherwise hit (loadgen's docstring lists them): the room's
  per-user rate limit off, ``max_members``, the inbound rate limit,
  ``max_connections`` (per user too) above the clients, outboxes above one
  burst (except in ``slow``: the defaults, which close the slow client with
  4008), a heartbeat an hour apart.
* ``hypercorn-batch``: the hypercorn transport again, the clients asking for
  batched frames (``options`` with ``batch: true``; loadgen ``--batch``):
  several events per WebSocket frame, which the ASGI path cannot otherwise
  coalesce into one write.
* ``hypercorn-paced``: ``hypercorn-batch`` with ``hub.min_write_interval`` =
  0.1 s: each connection writes at most every 100 ms, everything queued
  meanwhile in one frame (at most 100 ms more latency for many fewer
  hypercorn sends).
* ``starlette``, ``socketio``, ``channels``, ``hypercorn-naive``: the peers of
  ``benchmarks/peers/serve_peer.py`` (the ``bench`` extra), started with
  ``serve_peer.py KIND --host 127.0.0.1 --port P``; ready on their
  ``ready KIND URL`` line.

Scenarios (``--scenarios``), full sizes (``--quick`` in brackets):

* ``fanout``: 1,000 clients [200] in one room, one publisher, 100 and 1,000
  messages [50] of 100 bytes, each run twice [once]; the run with the median
  deliveries/s is kept (the lower one of two). Deliveries/s, server CPU µs per
  delivery, p50/p99/max latency, the generator's CPU.
* ``openloop``: a publisher at 10 % and 50 % of the saturation rate found by
  ``fanout`` (its deliveries/s with the most messages, over the clients;
  without a ``fanout`` result the server is probed with one such run) to 1,000
  clients [200] for 10 s [3]: latency from the scheduled send times, and the
  rate achieved.
* ``idle``: the server's RSS (``VmRSS``) before any connection, and while
  1,000, 5,000 and 10,000 [200, 500] idle connections are open (the median of
  a few samples over about a second): KB per connection, and the set-up rate.
  Then the accept burst: 5,000 [500] clients set up all at once (loadgen's
  ``--concurrency`` at the total), and how long until all were connected.
* ``slow``: loadgen's ``slow`` (100 clients [20], one of which stops reading,
  2,000 messages): the others' p99 against the baseline, the server's RSS
  during the run, and the slow client's fate (Ensemble closes it with 4008).
  2,000, not loadgen's default 1,000: the outbox holds 1,000 events by
  default and the kernel's socket buffers absorb a few hundred more, so with
  1,000 messages the slow client is never over the bound (measured: still
  open after 1,000, closed with 4008 from 1,500).
* ``echo``: 10,000 [500] sequential round trips on one connection.

A run that fails (a server that does not start, a missing extra, a crash, a
timeout) is recorded as failed, in the JSON and the tables, and the matrix
goes on; every wait is bounded.

Output: ``--out DIR/transports-<UTC timestamp>.json`` (the machine, the
versions of every server library, the command, every raw loadgen report, the
summary tables and the targets), a Markdown section on stdout (and in
``--markdown PATH``), and with ``--plot PATH`` a PNG: fan-out deliveries/s per
server (log scale) and the p99 latency of the same runs. While it runs, each
finished server's results are also in ``transports-<timestamp>.partial.json``
(``"complete": false``), replaced by the full report at the end: a matrix
that is stopped part way keeps what it measured.

Run: ``python benchmarks/bench_transports.py [--quick] [--servers native,hypercorn,...]
[--scenarios fanout,openloop,idle,slow,echo] [--out benchmarks/results]
[--plot docs/benchmarks-transports.png] [--markdown PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
from _common import machine_info, markdown_table, write_json

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "loadgen.py"
SERVE_PEER = HERE / "peers" / "serve_peer.py"

ENSEMBLE_SERVERS = {
    "native": ("native", False),
    "hypercorn": ("hypercorn", False),
    "hypercorn-batch": ("hypercorn", True),
    "hypercorn-paced": ("hypercorn", True),
}
"""Ensemble's rows: the transport, and whether the clients ask for batched frames."""
PACED_WRITE_INTERVAL: Final = 0.1
"""``hub.min_write_interval`` of ``hypercorn-paced`` (seconds)."""
PEER_KINDS = {"starlette": "plain", "socketio": "socketio", "channels": "plain", "hypercorn-naive": "plain"}
"""The peer servers and loadgen's wire adapter for each."""
SERVERS = ("native", "hypercorn", "hypercorn-batch", "hypercorn-paced", "starlette", "socketio", "channels", "hypercorn-naive")
SCENARIOS = ("fanout", "openloop", "idle", "slow", "echo")

LIBRARIES = ("trio", "hypercorn", "wsproto", "h11", "uvicorn", "websockets", "starlette", "channels", "django", "python-socketio", "orjson")

SERVER_START_TIMEOUT = 60.0
SERVER_STOP_TIMEOUT = 20.0  # Ensemble's graceful shutdown takes up to 10 s, hypercorn-naive's 3 s


@attrs.frozen
class Sizes:
    """What the matrix runs (the full sizes; :data:`QUICK` for ``--quick``)."""

    fanout_clients: int = 1000
    fanout_messages: tuple[int, ...] = (100, 1000)
    fanout_repeats: int = 2
    fanout_window: int = 100  # Ensemble servers: the largest fan-out again with a publisher keeping at most this many messages out
    openloop_clients: int = 1000
    openloop_loads: tuple[float, ...] = (0.1, 0.5)  # fractions of the saturation rate
    openloop_duration: float = 10.0
    idle_clients: tuple[int, ...] = (1000, 5000, 10000)
    # Seconds the idle connections are left alone before the "idle" reading
    # (Ensemble's actors hibernate after hub.hibernate_after = 10 s idle,
    # checked every 10 s); a "fresh" reading is taken at once too.
    idle_settle: float = 25.0
    accept_burst: int = 5000
    slow_clients: int = 100
    slow_messages: int = 2000  # more than the outbox's 1,000 events plus what the kernel buffers absorb (see the module docstring)
    echo_round_trips: int = 10_000
    workers: int = 2  # load-generator processes
    run_timeout: float = 120.0  # loadgen --timeout: seconds per counted run before a partial result
    setup_timeout: float = 300.0  # loadgen --setup-timeout


FULL = Sizes()
QUICK = Sizes(
    fanout_clients=200,
    fanout_messages=(50,),
    fanout_repeats=1,
    openloop_clients=200,
    openloop_duration=3.0,
    idle_clients=(200, 500),
    accept_burst=500,
    slow_clients=20,
    echo_round_trips=500,
    run_timeout=30.0,
    setup_timeout=60.0,
)


class RunFailed(Exception):
    """A server or a load-generator run failed; the message says how."""


# -- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE to its hard limit (the servers and loadgen inherit it); the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def rss_kb(pid: int) -> int | None:
    """``VmRSS`` of a process in KiB, or ``None`` once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def median_rss_kb(pid: int, samples: int = 5, over: float = 1.0) -> int | None:
    """The median of ``samples`` RSS readings spread over ``over`` seconds."""
    values = []
    for i in range(samples):
        if i:
            time.sleep(over / max(1, samples - 1))
        value = rss_kb(pid)
        if value is not None:
            values.append(value)
    return int(statistics.median(values)) if values else None


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread, while a run lasts."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            value = rss_kb(self.pid)
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak(self) -> int | None:
        return max(self.samples) if self.samples else None


def tail(path: Path, chars: int = 1500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:].strip()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of a process started with ``start_new_session`` (it and its children)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def ensemble_toml(clients: int, messages: int, *, slow: bool, min_write_interval: float = 0.0) -> str:
    """A TOML that lifts the limits a benchmark of ``clients`` x ``messages`` would hit (see loadgen's docstring)."""
    room = clients + 100
    if slow:
        outbox = "# outbox_max_events and outbox_max_bytes keep their defaults: they close the slow client (4008)."
    else:
        # One burst of messages plus the set-up traffic (each join's member events go to everyone).
        events = messages + clients + 1000
        outbox = f"outbox_max_events = {events}\noutbox_max_bytes = {max(1 << 20, events * 1024)}"
    if min_write_interval:
        outbox += f"\nmin_write_interval = {min_write_interval}"
    return f"""# written by benchmarks/bench_transports.py
[limits]
max_connections = {room}
max_connections_per_user = {room}

[heartbeat]
# N joins make N^2/2 member events: a ping queued behind them must not close busy clients.
interval = 3600
timeout = 3600

[hub]
{outbox}

[hub.room]
max_members = {room}
rate_limit = 0

[hub.rate_limit]
messages_per_second = 100000000
messages_per_minute = 1000000000
burst_size = 100000000
"""


@attrs.define
class ServerProcess:
    """A server under test, running."""

    name: str
    argv: list[str]
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


def _wait_ensemble_ready(proc: subprocess.Popen[bytes], port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailed(f"the server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RunFailed(f"the server was not ready after {SERVER_START_TIMEOUT:.0f} s")


def _wait_ready_line(proc: subprocess.Popen[bytes], out: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if any(line.startswith("ready ") for line in out.read_text(errors="replace").splitlines()):
                return
        if proc.poll() is not None:
            raise RunFailed(f"the server exited with status {proc.returncode} before it was ready")
        time.sleep(0.05)
    raise RunFailed(f"no 'ready' line after {SERVER_START_TIMEOUT:.0f} s")


@contextlib.contextmanager
def running_server(name: str, work: Path, *, clients: int, messages: int = 0, slow: bool = False) -> Iterator[ServerProcess]:
    """Start server ``name`` on a free port, wait until it is ready, stop it at the end.

    Raises:
        RunFailed: It exited, or was not ready within :data:`SERVER_START_TIMEOUT`.
    """
    port = free_port()
    stamp = f"{name}-{port}-{time.monotonic_ns()}"
    log = work / f"{stamp}.err"
    out = work / f"{stamp}.out"
    if name in ENSEMBLE_SERVERS:
        config = work / f"{stamp}.toml"
        interval = PACED_WRITE_INTERVAL if name == "hypercorn-paced" else 0.0
        config.write_text(ensemble_toml(clients, messages, slow=slow, min_write_interval=interval))
        transport = ENSEMBLE_SERVERS[name][0]
        argv = [sys.executable, "-m", "ensemble", "serve", "--transport", transport, "--port", str(port)]
        argv += ["--log-level", "warning", "--config", str(config)]
    elif name in PEER_KINDS:
        argv = [sys.executable, str(SERVE_PEER), name, "--host", "127.0.0.1", "--port", str(port)]
    else:
        raise RunFailed(f"unknown server {name!r}")
    with open(out, "wb") as stdout, open(log, "wb") as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True)
    server = ServerProcess(name, argv, port, proc, log)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        try:
            if name in ENSEMBLE_SERVERS:
                _wait_ensemble_ready(proc, port, deadline)
            else:
                _wait_ready_line(proc, out, deadline)
        except RunFailed as e:
            raise RunFailed(f"{name}: {e}: {tail(log, 600) or '(no output)'}") from None
        yield server
    finally:
        stop_server(server)


def stop_server(server: ServerProcess) -> int | None:
    """SIGTERM, then SIGKILL after :data:`SERVER_STOP_TIMEOUT`; the exit status."""
    proc = server.proc
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
    return proc.returncode


# -- loadgen runs ---------------------------------------------------------------------------


def loadgen_kind(server: str) -> tuple[str, list[str]]:
    """loadgen's ``--kind`` for a server, and its extra options."""
    if server in ENSEMBLE_SERVERS:
        return "ensemble", ["--batch"] if ENSEMBLE_SERVERS[server][1] else []
    return PEER_KINDS[server], []


def loadgen_argv(server: ServerProcess, scenario: str, sizes: Sizes, json_path: Path, *options: str) -> list[str]:
    kind, extra = loadgen_kind(server.name)
    argv = [sys.executable, str(LOADGEN), scenario, "--kind", kind, "--url", server.url, *extra]
    argv += ["--workers", str(sizes.workers), "--timeout", f"{sizes.run_timeout:g}", "--setup-timeout", f"{sizes.setup_timeout:g}"]
    argv += ["--server-pid", str(server.pid), "--no-machine", "--json", str(json_path), *options]
    return argv


def loadgen_bound(sizes: Sizes, runs: int = 1, extra: float = 0.0) -> float:
    """Seconds a loadgen subprocess may take before it is killed: its own timeouts, plus margins."""
    return sizes.setup_timeout + 30 + 120 + runs * (sizes.run_timeout + 30) + extra + 120


@attrs.define
class LoadgenRun:
    """One loadgen subprocess (its stdout and stderr go to files, so no pipe can fill)."""

    argv: list[str]
    json_path: Path
    out: Path
    err: Path
    proc: subprocess.Popen[bytes]
    started: float

    @classmethod
    def start(cls, argv: list[str], json_path: Path, *, stdin: bool = False) -> LoadgenRun:
        out, err = json_path.with_suffix(".out"), json_path.with_suffix(".err")
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True
            )
        return cls(argv, json_path, out, err, proc, time.monotonic())

    def stdout_line(self, prefix: str, timeout: float) -> str:
        """The first stdout line starting with ``prefix`` (RunFailed if it exits or the time is up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                for line in self.out.read_text(errors="replace").splitlines():
                    if line.startswith(prefix):
                        return line
            if self.proc.poll() is not None:
                raise RunFailed(f"loadgen exited with status {self.proc.returncode} before '{prefix}': {tail(self.err, 800)}")
            time.sleep(0.05)
        raise RunFailed(f"loadgen printed no '{prefix}' line within {timeout:.0f} s")

    def release(self) -> None:
        """Close its stdin (the idle scenario lets its connections go)."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def finish(self, timeout: float) -> dict[str, Any]:
        """Wait (at most ``timeout`` s, then kill it and its workers) and return its JSON report."""
        try:
            self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
            raise RunFailed(f"loadgen did not finish within {timeout:.0f} s (killed)") from None
        finally:
            self.release()
        if self.proc.returncode != 0:
            raise RunFailed(f"loadgen exited with status {self.proc.returncode}: {tail(self.err, 800)}")
        try:
            report: dict[str, Any] = json.loads(self.json_path.read_text())
        except (OSError, ValueError) as e:
            raise RunFailed(f"loadgen wrote no report: {e}") from None
        return report

    def kill(self) -> None:
        if self.proc.poll() is None:
            _kill_group(self.proc)
        self.release()


# -- the matrix ---------------------------------------------------------------------------------


class Matrix:
    """Runs the scenarios against the servers and keeps every run's record."""

    def __init__(self, sizes: Sizes, work: Path, log: Callable[[str], None] = print) -> None:
        self.sizes = sizes
        self.work = work
        self.log = log
        self.runs: list[dict[str, Any]] = []
        self.summary: dict[str, list[dict[str, Any]]] = {s: [] for s in SCENARIOS}

    # -- one run --------------------------------------------------------------------------

    def _record(self, server: str, scenario: str, label: str, params: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {
            "index": len(self.runs),
            "server": server,
            "scenario": scenario,
            "label": label,
            "params": params,
            "ok": False,
            "error": None,
            "report": None,
        }
        self.runs.append(record)
        return record

    def loadgen(
        self,
        server_name: str,
        scenario: str,
        label: str,
        options: Sequence[str],
        *,
        clients: int,
        messages: int = 0,
        slow: bool = False,
        runs: int = 1,
        extra_time: float = 0.0,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Start the server fresh, run loadgen ``scenario`` against it, stop the server; the run's record."""
        record = self._record(server_name, scenario, label, params or {})
        started = time.monotonic()
        self.log(f"  {server_name:<16} {label} ...")
        try:
            with running_server(server_name, self.work, clients=clients, messages=messages, slow=slow) as server:
                record["server_process"] = {"argv": server.argv, "port": server.port, "pid": server.pid}
                time.sleep(0.3)
                record["server_process"]["rss_before_kb"] = median_rss_kb(server.pid, 3, 0.3)
                json_path = self.work / f"lg-{record['index']}.json"
                argv = loadgen_argv(server, scenario, self.sizes, json_path, *options)
                record["loadgen_argv"] = argv
                with RssSampler(server.pid) as sampler:
                    run = LoadgenRun.start(argv, json_path)
                    try:
                        record["report"] = run.finish(loadgen_bound(self.sizes, runs, extra_time))
                    finally:
                        run.kill()
                record["server_process"]["rss_peak_kb"] = sampler.peak
                record["server_process"]["alive_after_run"] = alive = server.proc.poll() is None
            record["server_process"]["exit_status"] = server.proc.returncode
            if not alive:
                raise RunFailed(f"the server exited during the run with status {server.proc.returncode}: {tail(server.log, 600)}")
            record["ok"] = True
        except RunFailed as e:
            record["error"] = str(e)
        except Exception as e:  # the matrix goes on; the record says what happened
            record["error"] = f"{type(e).__name__}: {e}"
        record["elapsed_s"] = time.monotonic() - started
        self._say(record)
        return record

    def _say(self, record: dict[str, Any]) -> None:
        took = f"({record['elapsed_s']:.1f} s)"
        if not record["ok"]:
            self.log(f"    FAILED {took}: {record['error']}")
            return
        result = (record["report"] or {}).get("result", {})
        if "deliveries_per_s" in result:
            lat = result.get("latency", {})
            note = "" if result.get("finished") else " (partial: timed out)"
            self.log(f"    {result['deliveries_per_s']:,.0f} deliveries/s, p99 {_ms(lat.get('p99_us'))} ms{note} {took}")
        elif "round_trips_per_s" in result:
            self.log(f"    {result['round_trips_per_s']:,.0f} round trips/s, p99 {result['latency']['p99_us']:.0f} µs {took}")
        elif result.get("scenario") == "slow":
            fate = result.get("slow_client", {})
            self.log(
                f"    slow client: {fate.get('fate')} {fate.get('close_code') or ''}, p99 ratio {_num(result.get('p99_ratio'), 2)} {took}"
            )
        elif "setup" in result:
            setup = result["setup"]
            self.log(
                f"    {setup.get('ready')} connected in {_num(setup.get('seconds'), 2)} s ({_num(setup.get('clients_per_s'))}/s) {took}"
            )
        else:
            self.log(f"    done {took}")

    # -- scenarios --------------------------------------------------------------------------

    def fanout(self, server: str) -> None:
        s = self.sizes
        for messages in s.fanout_messages:
            records = []
            for i in range(s.fanout_repeats):
                label = f"fanout {s.fanout_clients} x {messages} #{i + 1}"
                options = ["--clients", str(s.fanout_clients), "--messages", str(messages)]
                params = {"clients": s.fanout_clients, "messages": messages, "repeat": i + 1}
                records.append(self.loadgen(server, "fanout", label, options, clients=s.fanout_clients, messages=messages, params=params))
            self.summary["fanout"].append(fanout_row(server, s.fanout_clients, messages, records))
        if s.fanout_window and server in ENSEMBLE_SERVERS:
            # A publisher that does not outrun the fan-out: its burst's latency
            # is the server's, not the length of its own queue.
            messages, window = max(s.fanout_messages), s.fanout_window
            records = []
            for i in range(s.fanout_repeats):
                label = f"fanout {s.fanout_clients} x {messages} window {window} #{i + 1}"
                options = ["--clients", str(s.fanout_clients), "--messages", str(messages), "--window", str(window)]
                params = {"clients": s.fanout_clients, "messages": messages, "window": window, "repeat": i + 1}
                records.append(self.loadgen(server, "fanout", label, options, clients=s.fanout_clients, messages=messages, params=params))
            row = fanout_row(server, s.fanout_clients, messages, records)
            row["window"] = window
            self.summary["fanout"].append(row)

    def saturation(self, server: str) -> tuple[float | None, str]:
        """Messages/s at saturation: the fanout with the most messages (deliveries/s over its clients)."""
        s = self.sizes
        messages = max(s.fanout_messages)
        rows = [
            r
            for r in self.summary["fanout"]
            if r["server"] == server and r["messages"] == messages and r["deliveries_per_s"] and not r.get("window")
        ]
        source = "fanout"
        if not rows:
            options = ["--clients", str(s.openloop_clients), "--messages", str(messages)]
            params = {"clients": s.openloop_clients, "messages": messages, "repeat": 1, "probe": True}
            record = self.loadgen(
                server,
                "fanout",
                f"saturation probe {s.openloop_clients} x {messages}",
                options,
                clients=s.openloop_clients,
                messages=messages,
                params=params,
            )
            rows = [fanout_row(server, s.openloop_clients, messages, [record])]
            source = f"probe (run {record['index']})"
        row = rows[0]
        if not row["deliveries_per_s"] or not row["clients"]:
            return None, source
        return row["deliveries_per_s"] / row["clients"], source

    def openloop(self, server: str) -> None:
        s = self.sizes
        saturation, source = self.saturation(server)
        for load in s.openloop_loads:
            row: dict[str, Any] = {
                "server": server,
                "load": load,
                "clients": s.openloop_clients,
                "duration_s": s.openloop_duration,
                "saturation_msgs_per_s": saturation,
                "saturation_from": source,
            }
            if saturation is None:
                row["error"] = "no saturation rate (the fanout run failed)"
                self.summary["openloop"].append(row)
                continue
            rate = saturation * load
            options = ["--clients", str(s.openloop_clients), "--rate", f"{rate:.6g}", "--duration", f"{s.openloop_duration:g}"]
            messages = max(1, int(rate * s.openloop_duration))
            params = {"clients": s.openloop_clients, "rate": rate, "load": load, "duration": s.openloop_duration}
            label = f"openloop {s.openloop_clients} clients at {load:.0%} ({rate:,.1f} msg/s)"
            record = self.loadgen(
                server,
                "openloop",
                label,
                options,
                clients=s.openloop_clients,
                messages=messages,
                extra_time=s.openloop_duration,
                params=params,
            )
            row.update(openloop_row(record, rate))
            self.summary["openloop"].append(row)

    def idle(self, server: str) -> None:
        s = self.sizes
        row: dict[str, Any] = {"server": server, "levels": [], "accept_burst": None}
        for n in s.idle_clients:
            record = self._record(server, "idle", f"idle {n}", {"clients": n})
            row["levels"].append(self._idle_level(server, n, record))
        row["rss_before_kb"] = next((lv["rss_before_kb"] for lv in row["levels"] if lv.get("rss_before_kb")), None)
        burst = s.accept_burst
        per_worker = math.ceil(burst / max(1, s.workers))
        options = ["--clients", str(burst), "--hold", "0", "--concurrency", str(per_worker)]
        record = self.loadgen(
            server, "idle", f"accept burst {burst} at once", options, clients=burst, params={"clients": burst, "burst": True}
        )
        setup = (record["report"] or {}).get("result", {}).get("setup", {}) if record["ok"] else {}
        row["accept_burst"] = {
            "run": record["index"],
            "clients": burst,
            "concurrency": per_worker * max(1, s.workers),
            "connected": setup.get("ready"),
            "failed": setup.get("failed"),
            "seconds": setup.get("seconds"),
            "clients_per_s": setup.get("clients_per_s"),
            "tcp_connected": setup.get("tcp_connected"),
            "tcp_seconds": setup.get("tcp_seconds"),
            "errors": setup.get("errors"),
            "error": record["error"],
        }
        self.summary["idle"].append(row)

    def _idle_level(self, server_name: str, n: int, record: dict[str, Any]) -> dict[str, Any]:
        s = self.sizes
        level: dict[str, Any] = {"clients": n, "run": record["index"]}
        started = time.monotonic()
        self.log(f"  {server_name:<16} idle {n} ...")
        try:
            with running_server(server_name, self.work, clients=n) as server:
                record["server_process"] = {"argv": server.argv, "port": server.port, "pid": server.pid}
                time.sleep(0.5)
                before = median_rss_kb(server.pid, 5, 0.5)
                json_path = self.work / f"lg-{record['index']}.json"
                argv = loadgen_argv(server, "idle", s, json_path, "--clients", str(n))
                record["loadgen_argv"] = argv
                run = LoadgenRun.start(argv, json_path, stdin=True)
                try:
                    line = run.stdout_line("connected ", s.setup_timeout + 60)
                    connected = int(line.split()[1])
                    fresh = median_rss_kb(server.pid, 5, 1.0)
                    time.sleep(s.idle_settle)
                    with_n = median_rss_kb(server.pid, 5, 1.0)
                    run.release()
                    record["report"] = run.finish(loadgen_bound(s, 0))
                finally:
                    run.kill()
                alive = server.proc.poll() is None
                record["server_process"].update(
                    {"rss_before_kb": before, "rss_fresh_kb": fresh, "rss_with_kb": with_n, "alive_after_run": alive}
                )
            record["server_process"]["exit_status"] = server.proc.returncode
            if not alive:
                raise RunFailed(f"the server exited during the run with status {server.proc.returncode}: {tail(server.log, 600)}")
            setup = record["report"]["result"]["setup"]
            level.update(
                {
                    "connected": connected,
                    "failed": setup.get("failed"),
                    "rss_before_kb": before,
                    "rss_kb": with_n,
                    "kb_per_conn": (with_n - before) / connected if before is not None and with_n is not None and connected else None,
                    "rss_fresh_kb": fresh,
                    "kb_per_conn_fresh": (fresh - before) / connected if before is not None and fresh is not None and connected else None,
                    "settle_s": s.idle_settle,
                    "setup_s": setup.get("seconds"),
                    "setup_per_s": setup.get("clients_per_s"),
                    "errors": setup.get("errors"),
                }
            )
            record["ok"] = True
        except RunFailed as e:
            record["error"] = str(e)
        except Exception as e:
            record["error"] = f"{type(e).__name__}: {e}"
        level["error"] = record["error"]
        record["elapsed_s"] = time.monotonic() - started
        if record["ok"]:
            self.log(
                f"    {_num(level['kb_per_conn'], 1)} KB/connection, {_num(level['setup_per_s'], 0)} connections/s ({record['elapsed_s']:.1f} s)"
            )
        else:
            self._say(record)
        return level

    def slow(self, server: str) -> None:
        s = self.sizes
        options = ["--clients", str(s.slow_clients), "--messages", str(s.slow_messages)]
        params = {"clients": s.slow_clients, "messages": s.slow_messages}
        label = f"slow {s.slow_clients} clients x {s.slow_messages}"
        record = self.loadgen(
            server,
            "slow",
            label,
            options,
            clients=s.slow_clients,
            messages=s.slow_messages,
            slow=True,
            runs=2,
            extra_time=60,
            params=params,
        )
        self.summary["slow"].append(slow_row(server, record))

    def echo(self, server: str) -> None:
        n = self.sizes.echo_round_trips
        record = self.loadgen(server, "echo", f"echo {n} round trips", ["--round-trips", str(n)], clients=1, params={"round_trips": n})
        self.summary["echo"].append(echo_row(server, record))


# -- summary rows -----------------------------------------------------------------------------


def _result(record: dict[str, Any]) -> dict[str, Any]:
    if not record["ok"] or not record.get("report"):
        return {}
    result: dict[str, Any] = record["report"].get("result") or {}
    return result


def _latency_ms(latency: dict[str, Any] | None) -> dict[str, float | None]:
    latency = latency or {}
    out: dict[str, float | None] = {}
    for k in ("p50", "p99", "max"):
        us = latency.get(f"{k}_us")
        out[f"{k}_ms"] = us / 1000 if us is not None else None
    return out


def _run_error(record: dict[str, Any], result: dict[str, Any]) -> str | None:
    if record["error"]:
        return str(record["error"])
    return str(result["error"]) if result.get("error") else None


def fanout_row(server: str, clients: int, messages: int, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The kept run of a fanout (the median by deliveries/s, the lower of two) as a table row."""
    good = [r for r in records if _result(r).get("deliveries_per_s")]
    row: dict[str, Any] = {
        "server": server,
        "clients": clients,
        "messages": messages,
        "runs": [r["index"] for r in records],
        "kept_run": None,
    }
    row.update(
        {
            "deliveries_per_s": None,
            "all_deliveries_per_s": [_result(r).get("deliveries_per_s") for r in records],
            "server_us_per_delivery": None,
            "p50_ms": None,
            "p99_ms": None,
            "max_ms": None,
            "generator_cpu_pct": None,
            "finished": False,
            "error": None,
        }
    )
    if not good:
        row["error"] = next((_run_error(r, _result(r)) for r in records if _run_error(r, _result(r))), "no deliveries")
        return row
    ranked = sorted(good, key=lambda r: _result(r)["deliveries_per_s"])
    kept = ranked[(len(ranked) - 1) // 2]
    result = _result(kept)
    wall = result.get("wall_s") or 0
    row.update(
        {
            "kept_run": kept["index"],
            "clients": result.get("clients") or clients,
            "deliveries": result.get("deliveries"),
            "expected": result.get("expected"),
            "deliveries_per_s": result["deliveries_per_s"],
            "server_us_per_delivery": (result.get("server") or {}).get("us_per_delivery"),
            **_latency_ms(result.get("latency")),
            "generator_cpu_pct": [c / wall * 100 if wall else None for c in result["generator"]["cpu_s"]],
            "setup_clients_per_s": result["setup"].get("clients_per_s"),
            "finished": bool(result.get("finished")),
            "close_codes": result.get("close_codes"),
            "publisher_errors": result["publisher"].get("errors"),
            "error": _run_error(kept, result),
        }
    )
    return row


def openloop_row(record: dict[str, Any], rate: float) -> dict[str, Any]:
    result = _result(record)
    row: dict[str, Any] = {"run": record["index"], "rate_msgs_per_s": rate, "error": _run_error(record, result)}
    if not result.get("deliveries_per_s"):
        row["error"] = row["error"] or "no deliveries"
        return row
    pub = result.get("publisher") or {}
    row.update(
        {
            "clients": result.get("clients"),
            "sent": pub.get("sent"),
            "achieved_msgs_per_s": pub["sent"] / pub["send_s"] if pub.get("send_s") else None,
            "offered_deliveries_per_s": result.get("offered_deliveries_per_s"),
            "deliveries_per_s": result["deliveries_per_s"],
            "worst_schedule_lag_ms": pub["worst_schedule_lag_us"] / 1000 if pub.get("worst_schedule_lag_us") is not None else None,
            **_latency_ms(result.get("latency")),
            "finished": bool(result.get("finished")),
        }
    )
    return row


def slow_row(server: str, record: dict[str, Any]) -> dict[str, Any]:
    result = _result(record)
    proc = record.get("server_process") or {}
    row: dict[str, Any] = {
        "server": server,
        "run": record["index"],
        "clients": record["params"]["clients"],
        "messages": record["params"]["messages"],
        "rss_before_kb": proc.get("rss_before_kb"),
        "rss_peak_kb": proc.get("rss_peak_kb"),
        "error": _run_error(record, result),
    }
    if "baseline" not in result:
        row["error"] = row["error"] or "no baseline run"
        return row
    base, loaded = result["baseline"], result.get("with_slow") or {}
    fate = result.get("slow_client") or {}
    row.update(
        {
            "baseline_p99_ms": _latency_ms(base.get("latency"))["p99_ms"],
            "with_slow_p99_ms": _latency_ms(loaded.get("latency"))["p99_ms"],
            "p99_ratio": result.get("p99_ratio"),
            "baseline_deliveries_per_s": base.get("deliveries_per_s"),
            "with_slow_deliveries_per_s": loaded.get("deliveries_per_s"),
            "others_finished": bool(loaded.get("finished")),
            "slow_fate": fate.get("fate"),
            "slow_close_code": fate.get("close_code"),
            # The other clients should all stay open: the close codes (or fates) of any that did not.
            "others_closed": dict(sum((Counter(run.get("close_codes") or {}) for run in (base, loaded)), Counter())),
        }
    )
    return row


def echo_row(server: str, record: dict[str, Any]) -> dict[str, Any]:
    result = _result(record)
    latency = result.get("latency") or {}
    return {
        "server": server,
        "run": record["index"],
        "round_trips": record["params"]["round_trips"],
        "p50_us": latency.get("p50_us"),
        "p99_us": latency.get("p99_us"),
        "max_us": latency.get("max_us"),
        "round_trips_per_s": result.get("round_trips_per_s"),
        "error": _run_error(record, result) if result else record["error"] or "no result",
    }


# -- targets ------------------------------------------------------------------------------------


def check_targets(summary: dict[str, list[dict[str, Any]]], sizes: Sizes) -> list[dict[str, Any]]:
    """The issue's targets for the native transport and hypercorn: met (True), missed (False), not measured (None)."""
    top = max(sizes.fanout_messages)
    fan = {r["server"]: r for r in summary.get("fanout", []) if r["messages"] == top and not r.get("window")}
    windowed = {r["server"]: r for r in summary.get("fanout", []) if r["messages"] == top and r.get("window")}
    target_size = sizes.fanout_clients == 1000 and top == 1000
    size_note = "" if target_size else f" (at {sizes.fanout_clients} x {top}, not the target's 1,000 x 1,000)"
    out: list[dict[str, Any]] = []

    def add(server: str, target: str, measured: str | None, met: bool | None) -> None:
        out.append({"server": server, "target": target, "measured": measured or "not measured", "met": met})

    native = fan.get("native")
    if native and native["deliveries_per_s"]:
        dps, p99 = native["deliveries_per_s"], native["p99_ms"]
        measured = f"{dps:,.0f} deliveries/s, p99 {_num(p99, 1)} ms{size_note}"
        add(
            "native",
            ">= 800,000 deliveries/s in 1,000 x 1,000 fan-out with p99 < 250 ms",
            measured,
            native["finished"] and dps >= 800_000 and p99 is not None and p99 < 250,
        )
    else:
        add("native", ">= 800,000 deliveries/s in 1,000 x 1,000 fan-out with p99 < 250 ms", None, None)
    flow = windowed.get("native")
    if flow and flow["deliveries_per_s"]:
        dps, p99 = flow["deliveries_per_s"], flow["p99_ms"]
        add(
            "native",
            f"the same with a publisher keeping at most {flow['window']} messages out",
            f"{dps:,.0f} deliveries/s, p99 {_num(p99, 1)} ms{size_note}",
            flow["finished"] and dps >= 800_000 and p99 is not None and p99 < 250,
        )
    low = min(sizes.openloop_loads)
    row = next(
        (r for r in summary.get("openloop", []) if r["server"] == "native" and r["load"] == low and r.get("p99_ms") is not None), None
    )
    add(
        "native",
        f"p99 < 20 ms at {low:.0%} of saturation",
        f"p99 {row['p99_ms']:.1f} ms at {row['rate_msgs_per_s']:,.1f} msg/s to {row['clients']} clients" if row else None,
        row["p99_ms"] < 20 if row else None,
    )
    us = native["server_us_per_delivery"] if native else None
    add(
        "native",
        "<= 2 µs server CPU per delivery",
        f"{us:.2f} µs{size_note}" if us is not None else None,
        us <= 2 if us is not None else None,
    )
    idle = next((r for r in summary.get("idle", []) if r["server"] == "native"), None)
    level = next((lv for lv in reversed(idle["levels"]) if lv.get("kb_per_conn") is not None), None) if idle else None
    add(
        "native",
        "<= 12 KB per idle connection",
        f"{level['kb_per_conn']:.1f} KB at {level['connected']:,} connections" if level else None,
        level["kb_per_conn"] <= 12 if level else None,
    )
    naive = fan.get("hypercorn-naive")
    for server in ("hypercorn", "hypercorn-batch", "hypercorn-paced"):
        row = fan.get(server)
        target = ">= 3x the hypercorn-naive fan-out" + {
            "hypercorn-batch": " (batched frames)",
            "hypercorn-paced": f" (batched frames, writes {PACED_WRITE_INTERVAL * 1000:g} ms apart)",
        }.get(server, "")
        if row and row["deliveries_per_s"] and naive and naive["deliveries_per_s"]:
            ratio = row["deliveries_per_s"] / naive["deliveries_per_s"]
            measured = f"{ratio:.2f}x ({row['deliveries_per_s']:,.0f} vs {naive['deliveries_per_s']:,.0f} deliveries/s){size_note}"
            add(server, target, measured, ratio >= 3)
        elif server == "hypercorn" or row:
            add(server, target, None, None)
    return out


# -- Markdown ------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _msgs(row: dict[str, Any]) -> str:
    return f"{row['messages']:,}" + (f" (window {row['window']})" if row.get("window") else "")


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:,.1f}"


def _failed(error: str | None) -> str:
    return "FAILED: " + " ".join(str(error).split())[:100]


def render_markdown(report: dict[str, Any]) -> str:
    """The Markdown section of a run: tables per scenario and the targets."""
    summary = report["summary"]
    sizes = report["sizes"]
    info = report.get("machine") or {}
    parts = [
        f"## Transports ({'quick' if report.get('quick') else 'full'} run, {report['started_utc']})",
        "",
        f"{info.get('cpu', '?')}, {info.get('nproc', '?')} CPUs, {info.get('memory', '?')}; "
        f"{info.get('implementation', 'Python')} {info.get('python', '?')}; other processes kept "
        f"{_num(info.get('busy_cpus_before'), 2)} CPUs busy just before the run. "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        "",
        f"Command: `{report['command']}` ({report['elapsed_s'] / 60:.1f} min). Raw reports: `{report.get('json_path', '')}`.",
    ]
    if summary.get("fanout"):
        rows = []
        for r in summary["fanout"]:
            if r["deliveries_per_s"] is None:
                rows.append([r["server"], f"{r['clients']:,}", _msgs(r), _failed(r["error"]), "", "", "", "", ""])
                continue
            dps = _num(r["deliveries_per_s"]) + ("" if r["finished"] else " (partial)")
            gen = "/".join(_num(c) for c in r["generator_cpu_pct"] or [])
            rows.append(
                [
                    r["server"],
                    f"{r['clients']:,}",
                    _msgs(r),
                    dps,
                    _num(r["server_us_per_delivery"], 2),
                    _num(r["p50_ms"], 1),
                    _num(r["p99_ms"], 1),
                    _num(r["max_ms"], 1),
                    gen,
                ]
            )
        header = ["server", "clients", "msgs", "deliveries/s", "server µs/delivery", "p50 ms", "p99 ms", "max ms", "generator CPU %"]
        repeats = sizes["fanout_repeats"]
        parts += [
            "",
            "### Fan-out",
            "",
            markdown_table(header, rows, right=range(1, 9)),
            "",
            "One publisher sends the messages (100 bytes) pipelined; deliveries/s from its first send to the last client's last delivery. "
            + (f"Each size ran {repeats} times; the run with the median deliveries/s is shown (the lower of two). " if repeats > 1 else "")
            + "Server µs/delivery: its CPU time (`/proc/PID/stat`, 10 ms ticks) over the deliveries. "
            "Generator CPU %: each load-generator worker's CPU time over the run's wall time (100 % = one core saturated). "
            "`hypercorn-batch` is the hypercorn transport with clients that ask for batched frames "
            '(`{"type":"options","batch":true}`): the events queued for a connection go out as one frame '
            "(a JSON array), which the ASGI path cannot otherwise write at once; `hypercorn-paced` is that with "
            f"`hub.min_write_interval` = {PACED_WRITE_INTERVAL:g} s (each connection writes at most every "
            f"{PACED_WRITE_INTERVAL * 1000:g} ms). "
            '"(partial)": the run hit its timeout; the rate is of what was delivered. '
            '"(window N)": the same burst from a publisher that keeps at most N messages out (it waits for its own copy '
            "of a message, as a flow-controlled client would), so latency is the server's and not the publisher's own queue.",
        ]
    if summary.get("openloop"):
        rows = []
        for r in summary["openloop"]:
            if r.get("deliveries_per_s") is None:
                rows.append([r["server"], f"{r['load']:.0%}", _num(r.get("rate_msgs_per_s"), 1), _failed(r.get("error")), "", "", "", ""])
                continue
            rows.append(
                [
                    r["server"],
                    f"{r['load']:.0%}",
                    _num(r["rate_msgs_per_s"], 1),
                    _num(r["achieved_msgs_per_s"], 1),
                    _num(r["deliveries_per_s"]) + ("" if r["finished"] else " (partial)"),
                    _num(r["p50_ms"], 1),
                    _num(r["p99_ms"], 1),
                    _num(r["max_ms"], 1),
                ]
            )
        header = ["server", "load", "rate msg/s", "achieved msg/s", "deliveries/s", "p50 ms", "p99 ms", "max ms"]
        parts += [
            "",
            "### Open loop",
            "",
            markdown_table(header, rows, right=range(2, 8)),
            "",
            f"A publisher at a fixed rate to {sizes['openloop_clients']:,} clients for {sizes['openloop_duration']:g} s; load is the share of "
            "the saturation rate (the fan-out's deliveries/s with the most messages, over its clients). Latency is measured from "
            "each message's scheduled send time, so a server that falls behind is not excused (no coordinated omission).",
        ]
    if summary.get("idle"):
        levels = list(sizes["idle_clients"])
        rows = []
        for r in summary["idle"]:
            by_n = {lv["clients"]: lv for lv in r["levels"]}
            cells = [r["server"], _num((r.get("rss_before_kb") or 0) / 1024 if r.get("rss_before_kb") else None, 1)]
            for n in levels:
                lv = by_n.get(n) or {}
                cell = _num(lv.get("kb_per_conn"), 1) if not lv.get("error") else "FAILED"
                if not lv.get("error") and lv.get("kb_per_conn_fresh") is not None:
                    cell += f" ({_num(lv['kb_per_conn_fresh'], 1)})"
                if lv.get("connected") is not None and lv["connected"] != n:
                    cell += f" ({lv['connected']:,} connected)"
                cells.append(cell)
            top = by_n.get(levels[-1]) or {}
            cells.append(_num(top.get("setup_per_s")))
            burst = r.get("accept_burst") or {}
            if burst.get("error") or burst.get("seconds") is None:
                cells.append("FAILED" if burst.get("error") else "-")
            else:
                cells.append(f"{burst['seconds']:.2f} s ({burst['connected']:,}/{burst['clients']:,})")
            tcp = burst.get("tcp_seconds")
            cells.append("-" if tcp is None else f"{tcp:.2f} s ({burst.get('tcp_connected') or 0:,})")
            rows.append(cells)
        header = [
            "server",
            "RSS before MiB",
            *[f"KB/conn @{n:,} (fresh)" for n in levels],
            f"setup conn/s @{levels[-1]:,}",
            f"{sizes['accept_burst']:,} at once: ready",
            "of which TCP accepted",
        ]
        failures = [f"{r['server']} @{lv['clients']:,}: {lv['error']}" for r in summary["idle"] for lv in r["levels"] if lv.get("error")]
        failures += [
            f"{r['server']} burst: {r['accept_burst']['error']}" for r in summary["idle"] if (r.get("accept_burst") or {}).get("error")
        ]
        parts += [
            "",
            "### Idle connections: memory and set-up",
            "",
            markdown_table(header, rows, right=range(1, len(header))),
            "",
            "KB per connection = (server RSS with N idle connections - RSS before any connection) / N; each N on a fresh server, "
            "RSS the median of 5 readings of `VmRSS` over about 1 s, taken once loadgen reported every client connected (Ensemble: "
            f"the welcome received; not joined) and left alone for {sizes.get('idle_settle', 0):g} s (in brackets: the same at "
            "once, while the connections are fresh). Set-up rate: clients ready per second with loadgen's default concurrency. "
            f'"{sizes["accept_burst"]:,} at once": loadgen sets up all clients concurrently; the time from the first connect to '
            "the last client ready (connected/asked), and the time until the last TCP connection was established (the "
            "server's kernel accepted it from the listen backlog).",
        ]
        if failures:
            parts += ["", "Failures: " + "; ".join(" ".join(f.split())[:160] for f in failures)]
    if summary.get("slow"):
        rows = []
        for r in summary["slow"]:
            if r.get("baseline_p99_ms") is None and r.get("error"):
                rows.append([r["server"], _failed(r["error"]), "", "", "", "", ""])
                continue
            fate = r.get("slow_fate") or "-"
            if fate == "close":
                fate = f"closed {r.get('slow_close_code')}"
            if r.get("others_closed"):
                fate += "; others closed: " + ", ".join(f"{k} ({v})" for k, v in r["others_closed"].items())
            rss = f"{_num((r['rss_before_kb'] or 0) / 1024, 0)} -> {_num((r['rss_peak_kb'] or 0) / 1024, 0)}"
            others = "" if r.get("others_finished") else " (others timed out)"
            rows.append(
                [
                    r["server"],
                    _num(r["baseline_p99_ms"], 1),
                    _num(r["with_slow_p99_ms"], 1) + others,
                    _num(r.get("p99_ratio"), 2),
                    _num(r.get("with_slow_deliveries_per_s")),
                    rss,
                    fate,
                ]
            )
        header = [
            "server",
            "baseline p99 ms",
            "with slow p99 ms",
            "ratio",
            "deliveries/s with slow",
            "RSS MiB before -> peak",
            "slow client",
        ]
        parts += [
            "",
            "### A slow consumer",
            "",
            markdown_table(header, rows, right=range(1, 6)),
            "",
            f"{sizes['slow_clients'] - 1} clients get {sizes['slow_messages']:,} messages (baseline), then one more client joins, stops "
            f"reading (`SO_RCVBUF` 4096) and {sizes['slow_messages']:,} more are sent: the others' p99 against the baseline, the "
            "server's peak RSS (sampled every 0.2 s), and what happened to the slow client (Ensemble runs with its default outbox "
            "bounds here, which close a slow consumer with 4008).",
        ]
    if summary.get("echo"):
        rows = []
        for r in summary["echo"]:
            if r.get("p50_us") is None:
                rows.append([r["server"], f"{r['round_trips']:,}", _failed(r["error"]), "", "", ""])
                continue
            rows.append(
                [
                    r["server"],
                    f"{r['round_trips']:,}",
                    _num(r["p50_us"]),
                    _num(r["p99_us"]),
                    _num(r["max_us"]),
                    _num(r["round_trips_per_s"]),
                ]
            )
        parts += [
            "",
            "### Echo",
            "",
            markdown_table(["server", "round trips", "p50 µs", "p99 µs", "max µs", "round trips/s"], rows, right=range(1, 6)),
            "",
            "One connection, sequential round trips (Ensemble: a `ping` with a ref and its reply; the peers: a message broadcast "
            "back to its only client).",
        ]
    if report.get("targets"):
        rows = [
            [t["server"], t["target"], t["measured"], {True: "met", False: "missed", None: "not measured"}[t["met"]]]
            for t in report["targets"]
        ]
        parts += ["", "### Targets", "", markdown_table(["server", "target", "measured", "result"], rows, right=())]
    return "\n".join(parts) + "\n"


# -- the plot -------------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: str) -> str | None:
    """Fan-out deliveries/s (log scale) and p99 latency per server, for each message count; None, or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.transforms import blended_transform_factory
    except ImportError as e:
        return f"no plot: {e}"
    rows = [r for r in report["summary"].get("fanout") or [] if not r.get("window")]
    if not rows:
        return "no plot: no fan-out results"
    servers = [s for s in report["servers"] if any(r["server"] == s for r in rows)]
    counts = sorted({r["messages"] for r in rows})
    by = {(r["server"], r["messages"]): r for r in rows}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / len(counts)
    for j, k in enumerate(counts):
        xs = [i + (j - (len(counts) - 1) / 2) * width for i in range(len(servers))]
        dps = [(by.get((s, k)) or {}).get("deliveries_per_s") or 0 for s in servers]
        p99 = [(by.get((s, k)) or {}).get("p99_ms") or 0 for s in servers]
        clients = next((by[(s, k)]["clients"] for s in servers if (s, k) in by), 0)
        ax1.bar(xs, dps, width, label=f"{clients:,} clients x {k:,} messages")
        ax2.bar(xs, p99, width, label=f"{clients:,} clients x {k:,} messages")
        for x, v in zip(xs, dps, strict=True):
            if v:
                ax1.annotate(f"{v:,.0f}", (x, v), ha="center", va="bottom", fontsize=7, rotation=90)
            else:  # no bar on a log scale: say so at the bottom of the panel
                ax1.text(
                    x,
                    0.02,
                    "failed",
                    transform=blended_transform_factory(ax1.transData, ax1.transAxes),
                    ha="center",
                    fontsize=7,
                    rotation=90,
                )
    for ax, title, unit in ((ax1, "Fan-out throughput", "deliveries/s (log)"), (ax2, "Fan-out p99 latency", "p99 ms (log)")):
        ax.set_yscale("log")
        ax.set_xticks(range(len(servers)))
        ax.set_xticklabels(servers, rotation=30, ha="right")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    measured = [r["deliveries_per_s"] for r in rows if r.get("deliveries_per_s")]
    if measured:
        ax1.set_ylim(min(measured) / 2, max(measured) * 4)  # room for the labels above the bars
    info = report.get("machine") or {}
    fig.suptitle(f"Ensemble transports vs peers ({info.get('nproc', '?')} CPUs, loopback; {report['started_utc']})", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# -- running it all -------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _sysctl(name: str) -> str | None:
    """A kernel setting from /proc/sys (the listen backlog's cap, the socket buffer sizes)."""
    try:
        return " ".join(Path(f"/proc/sys/{name}").read_text().split())
    except OSError:
        return None


def run(
    servers: Sequence[str],
    scenarios: Sequence[str],
    sizes: Sizes,
    *,
    out_dir: str | Path | None,
    command: str,
    quick: bool = False,
    plot_path: str | None = None,
    markdown_path: str | None = None,
    info: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the matrix; the report (also written to ``out_dir``, the Markdown and the plot as asked)."""
    started = time.monotonic()
    now = datetime.datetime.now(datetime.UTC)
    nofile = raise_nofile_limit()
    report: dict[str, Any] = {
        "benchmark": "transports",
        "started_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "quick": quick,
        "machine": info if info is not None else machine_info(),
        "versions": versions(),
        "rlimit_nofile": nofile,
        "sysctl": {
            name: _sysctl(name) for name in ("net/core/somaxconn", "net/ipv4/tcp_max_syn_backlog", "net/ipv4/tcp_wmem", "net/ipv4/tcp_rmem")
        },
        "servers": list(servers),
        "scenarios": list(scenarios),
        "sizes": attrs.asdict(sizes),
    }
    need = max([*sizes.idle_clients, sizes.accept_burst] if "idle" in scenarios else [0])
    if nofile < need + 1000:
        log(f"WARNING: RLIMIT_NOFILE is {nofile}; {need:,} idle connections need more (the runs will record the failures)")
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    partial = Path(out_dir) / f"transports-{stamp}.partial.json" if out_dir is not None else None
    with tempfile.TemporaryDirectory(prefix="bench-transports-") as tmp:
        matrix = Matrix(sizes, Path(tmp), log)
        for server in servers:
            log(f"{server}:")
            for scenario in SCENARIOS:
                if scenario in scenarios:
                    getattr(matrix, scenario)(server)
            if partial is not None:
                # A long matrix that dies later keeps what it measured so far.
                partial.parent.mkdir(parents=True, exist_ok=True)
                so_far = {k: v for k, v in matrix.summary.items() if k in scenarios}
                write_json(str(partial), {**report, "complete": False, "summary": so_far, "runs": matrix.runs})
    report["summary"] = {k: v for k, v in matrix.summary.items() if k in scenarios}
    report["targets"] = check_targets(report["summary"], sizes)
    report["runs"] = matrix.runs
    report["elapsed_s"] = time.monotonic() - started
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        report["json_path"] = str(Path(out_dir) / f"transports-{stamp}.json")
    if plot_path:
        report["plot"] = plot_path
        problem = plot(report, plot_path)
        if problem:
            report["plot"] = None
            report["plot_problem"] = problem
            log(problem)
    markdown = render_markdown(report)
    report["markdown"] = markdown
    if report.get("json_path"):
        write_json(report["json_path"], report)
        if partial is not None:
            partial.unlink(missing_ok=True)
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(markdown)
    return report


def _choices(value: str, allowed: Sequence[str], what: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"{what}: choose from {', '.join(allowed)} (got {value!r})")
    return chosen


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each: a few minutes")
    parser.add_argument(
        "--servers",
        type=lambda v: _choices(v, SERVERS, "--servers"),
        default=list(SERVERS),
        help=f"comma-separated (default: {','.join(SERVERS)})",
    )
    parser.add_argument(
        "--scenarios",
        type=lambda v: _choices(v, SCENARIOS, "--scenarios"),
        default=list(SCENARIOS),
        help=f"comma-separated (default: {','.join(SCENARIOS)})",
    )
    parser.add_argument("--out", default=str(HERE / "results"), help="folder of the JSON report (default: benchmarks/results)")
    parser.add_argument("--plot", metavar="PNG", help="also plot the fan-out results here")
    parser.add_argument("--markdown", metavar="PATH", help="also write the Markdown section here")
    parser.add_argument("--workers", type=int, help="load-generator processes (default 2)")
    parser.add_argument("--repeats", type=int, help="fan-out runs per size, the median kept (default 2)")
    parser.add_argument("--run-timeout", type=float, help="seconds per counted run before a partial result (default 120)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.workers:
        sizes = attrs.evolve(sizes, workers=args.workers)
    if args.repeats:
        sizes = attrs.evolve(sizes, fanout_repeats=args.repeats)
    if args.run_timeout:
        sizes = attrs.evolve(sizes, run_timeout=args.run_timeout)
    command = " ".join([os.path.basename(sys.executable), "benchmarks/bench_transports.py", *map(shlex.quote, argv)])
    report = run(
        args.servers,
        args.scenarios,
        sizes,
        out_dir=args.out,
        command=command,
        quick=args.quick,
        plot_path=args.plot,
        markdown_path=args.markdown,
    )
    print()
    print(report["markdown"], end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
