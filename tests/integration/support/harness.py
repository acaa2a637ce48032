"""
Real processes on loopback for the integration tests and the benchmark: the proxy (the
C{twist sipproxy} command, i.e. C{twistd -n} without a pidfile) and sipp.

Everything here is bounded: every wait has a deadline, every process is killed on the way out,
and every failure message carries the tail of the logs that explain it.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sipproxy.testing import toml_text

__all__ = [
    "REPO_ROOT",
    "SCENARIOS",
    "HarnessError",
    "ProxyProcess",
    "Sipp",
    "SippProcess",
    "SippResult",
    "free_port",
    "options_probe",
    "read_tail",
    "sipp_available",
    "wait_for",
    "wait_started",
]

REPO_ROOT = Path(__file__).resolve().parents[3]
SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
LOOPBACK = "127.0.0.1"


class HarnessError(Exception):
    """A process of the harness did not start, answer or stop as it should."""


# --- ports and small helpers -------------------------------------------------------------------


def free_port(host: str = LOOPBACK, attempts: int = 50) -> int:
    """
    A port that is free for both UDP and TCP on C{host} right now.

    The proxy often listens on both transports on one port number, and sipp may use either.
    """
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise HarnessError(f"no port free for both UDP and TCP on {host} after {attempts} tries")


def read_tail(path: Path, lines: int = 60, max_bytes: int = 64 * 1024) -> str:
    """The last lines of a (log) file, or a note that it is missing."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError as e:
        return f"<{path}: {e.strerror}>"
    text = data.decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def options_probe(
    host: str, port: int, transport: str = "udp", timeout: float = 0.5
) -> bytes | None:
    """
    Send one OPTIONS with Max-Forwards: 0 and return the first bytes of the answer, if any.

    Any SIP response means the proxy is up; a proxy answers this one itself with 483.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    with socket.socket(family, kind) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            local_host, local_port = s.getsockname()[:2]
            call_id = uuid.uuid4().hex
            sent_by = f"[{local_host}]" if ":" in local_host else local_host
            message = (
                f"OPTIONS sip:probe@{sent_by} SIP/2.0\r\n"
                f"Via: SIP/2.0/{transport.upper()} {sent_by}:{local_port}"
                f";branch=z9hG4bK{call_id[:16]};rport\r\n"
                "Max-Forwards: 0\r\n"
                f"From: <sip:probe@{sent_by}>;tag={call_id[:8]}\r\n"
                f"To: <sip:probe@{sent_by}>\r\n"
                f"Call-ID: {call_id}@harness\r\n"
                "CSeq: 1 OPTIONS\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()
            s.sendall(message)
            data = s.recv(65535)
        except OSError:
            return None
    return data if data.startswith(b"SIP/2.0 ") else None


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/PID/stat), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _session_pids(sid: int) -> list[int]:
    """Every live process in session C{sid}: a proxy that forks workers (kamailio) counts whole."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def _proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise HarnessError(f"no VmRSS for pid {pid}")


# --- the proxy -----------------------------------------------------------------------------------


class ProxyProcess:
    """
    One proxy process with its own config file and logs in C{workdir}.

    Use as a context manager, or call L{start} and L{stop}. C{command} replaces the default
    command line (C{{config}} and C{{log}} in it are filled in): the benchmark uses it to run
    other proxies through the same harness.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        name: str = "proxy",
        command: Sequence[str] | None = None,
        ready_timeout: float = 20.0,
        stop_timeout: float = 10.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.workdir = Path(workdir)
        self.name = name
        self.config_path = self.workdir / f"{name}.toml"
        self.log_path = self.workdir / f"{name}.log"
        self.output_path = self.workdir / f"{name}.out"
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._command = command
        self._env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def command(self) -> list[str]:
        if self._command is not None:
            return [
                part.format(config=self.config_path, log=self.log_path) for part in self._command
            ]
        # `python -m twisted` is `twist`: twistd -n without a pidfile, logging where we say.
        return [
            sys.executable,
            "-m",
            "twisted",
            f"--log-file={self.log_path}",
            "--log-format=text",
            "sipproxy",
            "--config",
            str(self.config_path),
        ]

    @property
    def pid(self) -> int:
        if self.process is None:
            raise HarnessError(f"{self.name} is not started")
        return self.process.pid

    def listeners(self) -> list[tuple[str, str, int]]:
        """(transport, address, port) of every [[listen]] in the config."""
        found = []
        for entry in self.config.get("listen", ()):
            address = str(entry.get("address", LOOPBACK))
            if address in ("0.0.0.0", "::"):
                address = LOOPBACK if address == "0.0.0.0" else "::1"
            found.append((str(entry.get("transport", "udp")), address, int(entry["port"])))
        return found

    def address(self, transport: str = "udp") -> tuple[str, int]:
        """The (host, port) the proxy listens on for C{transport}."""
        for kind, host, port in self.listeners():
            if kind == transport:
                return host, port
        raise HarnessError(f"{self.name} has no {transport} listener in its config")

    def start(self) -> ProxyProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if "listen" in self.config:
            config = dict(self.config)
            if self._command is None:
                # tests send traffic to loopback only: no DNS lookups toward resolv.conf servers
                config.setdefault("dns", {"servers": []})
            # many proxies at once: each admin listener (on by default, port 8080) on a port
            # of its own; a test that reads it names the port ([admin] port = free_port())
            config.setdefault("admin", {"port": 0})
            self.config_path.write_text(toml_text(config))
        env = dict(os.environ)
        # The checkout first, so `twist` finds this tree's sipproxy and twisted/plugins even
        # without an install; the real twisted package still wins (ours has no __init__.py).
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env.update(self._env or {})
        with self.output_path.open("wb") as out:
            self.process = subprocess.Popen(
                self.command(),
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        """Until the proxy answers an OPTIONS on its first listener, or fail with its logs."""
        listeners = self.listeners()
        if not listeners:
            raise HarnessError(f"{self.name}: no [[listen]] to probe")
        transport, host, port = next(
            (entry for entry in listeners if entry[0] == "udp"), listeners[0]
        )
        if transport not in ("udp", "tcp"):
            raise HarnessError(f"{self.name}: cannot probe a {transport} listener")
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                self.returncode = self.process.returncode
                raise HarnessError(
                    f"{self.name} exited with status {self.returncode} before answering on "
                    f"{transport}:{host}:{port}\n{self.log_tail()}"
                )
            if options_probe(host, port, transport) is not None:
                return
            time.sleep(0.1)
        raise HarnessError(
            f"{self.name} did not answer an OPTIONS on {transport}:{host}:{port} within "
            f"{self.ready_timeout} s\n{self.log_tail()}"
        )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it has not gone within the stop timeout."""
        process = self.process
        if process is None:
            return self.returncode
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.returncode = process.returncode
        return self.returncode

    def cpu_seconds(self, whole_session: bool = False) -> float:
        """
        CPU time (user + system) the proxy has used so far, from /proc/PID/stat.

        With C{whole_session}, summed over every process of its session (it was started as a
        session leader), for proxies that work in child processes.
        """
        if not whole_session:
            return _proc_cpu_seconds(self.pid)
        total = 0.0
        for pid in _session_pids(self.pid):
            try:
                total += _proc_cpu_seconds(pid)
            except (OSError, ValueError):
                continue
        return total

    def rss_kib(self, whole_session: bool = False) -> int:
        """VmRSS; with C{whole_session} summed over its processes (shared pages counted twice)."""
        if not whole_session:
            return _proc_rss_kib(self.pid)
        total = 0
        for pid in _session_pids(self.pid):
            try:
                total += _proc_rss_kib(pid)
            except (OSError, HarnessError):
                continue
        return total

    def log_tail(self, lines: int = 60) -> str:
        return (
            f"--- {self.name} output ({self.output_path}) ---\n"
            f"{read_tail(self.output_path, lines)}\n"
            f"--- {self.name} log ({self.log_path}) ---\n"
            f"{read_tail(self.log_path, lines)}"
        )

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- sipp ----------------------------------------------------------------------------------------


def sipp_available(binary: str = "sipp") -> bool:
    from shutil import which

    return which(binary) is not None


@dataclass
class SippResult:
    """What one sipp run did: its exit status and its call counters."""

    name: str
    returncode: int | None
    successful: int
    failed: int
    killed: bool
    stats_path: Path
    errors_path: Path
    output_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    def ok(self, calls: int | None = None) -> bool:
        """Exit status 0, no failed call, and (if given) exactly C{calls} successful calls."""
        return (
            self.returncode == 0
            and self.failed == 0
            and not self.killed
            and (calls is None or self.successful == calls)
        )

    def describe(self, lines: int = 30) -> str:
        """A summary with the tails of sipp's error log and output, for assertion messages."""
        return (
            f"sipp {self.name}: exit {self.returncode}{' (killed)' if self.killed else ''}, "
            f"{self.successful} successful, {self.failed} failed calls\n"
            f"--- {self.errors_path.name} ---\n{read_tail(self.errors_path, lines)}\n"
            f"--- {self.output_path.name} ---\n{read_tail(self.output_path, lines)}"
        )


def _read_stats(path: Path) -> tuple[int, int, dict[str, str]]:
    """Successful and failed call counters from the last row of sipp's -trace_stat CSV."""
    try:
        with path.open(newline="") as f:
            rows = [row for row in csv.reader(f, delimiter=";") if row]
    except OSError:
        return 0, 0, {}
    if len(rows) < 2:
        return 0, 0, {}
    header, last = rows[0], rows[-1]
    values = dict(zip(header, last, strict=False))

    def count(name: str) -> int:
        try:
            return int(values.get(name, "0") or 0)
        except ValueError:
            return 0

    return count("SuccessfulCall(C)"), count("FailedCall(C)"), values


def _read_screen(path: Path) -> tuple[int, int] | None:
    """Successful and failed calls from the last screen sipp dumped (-trace_screen), if any."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    counts: dict[str, int] = {}
    for line in text.splitlines():
        for label in ("Successful call", "Failed call"):
            if line.strip().startswith(label):
                cells = [c.strip() for c in line.split("|")]
                try:
                    counts[label] = int(cells[2])  # the cumulative column
                except (IndexError, ValueError):
                    continue
    if "Successful call" not in counts:
        return None
    return counts["Successful call"], counts.get("Failed call", 0)


class SippProcess:
    """One sipp running in the background; L{wait} always leaves it dead."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        workdir: Path,
        timeout: float,
    ) -> None:
        self.name = name
        self.argv = argv
        self.timeout = timeout
        self.stats_path = workdir / f"{name}.csv"
        self.errors_path = workdir / f"{name}_errors.log"
        self.screen_path = workdir / f"{name}_screen.log"
        self.output_path = workdir / f"{name}.out"
        self.started = time.monotonic()
        with self.output_path.open("wb") as out:
            self.process = subprocess.Popen(
                argv,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=out,
                start_new_session=True,
            )
        self._result: SippResult | None = None

    def running(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover - a kill that does not kill
                pass

    def wait(self, timeout: float | None = None) -> SippResult:
        """Wait (at most C{timeout}, default sipp's own timeout plus a margin), then kill."""
        if self._result is not None:
            return self._result
        if timeout is None:
            # sipp's own -timeout ends it; the margin covers its shutdown.
            remaining = max(0.0, self.started + self.timeout + 10 - time.monotonic())
        else:
            remaining = timeout
        killed = False
        try:
            self.process.wait(remaining)
        except subprocess.TimeoutExpired:
            killed = True
            self.kill()
        successful, failed, values = _read_stats(self.stats_path)
        # The final screen is written at exit; the CSV's last periodic row may predate the end.
        screen = _read_screen(self.screen_path)
        if screen is not None:
            successful, failed = screen
        self._result = SippResult(
            name=self.name,
            returncode=self.process.returncode,
            successful=successful,
            failed=failed,
            killed=killed,
            stats_path=self.stats_path,
            errors_path=self.errors_path,
            output_path=self.output_path,
            extra=values,
        )
        return self._result


class Sipp:
    """
    Runs sipp UAS and UAC processes for one test, all of them killed by L{cleanup}.

    Transport: C{u1} (UDP, one socket), C{t1} (TCP, one connection), C{tn} (TCP, one per call).
    C{keys} become C{-key NAME VALUE} (the scenario's [NAME]); C{variables} become
    C{-set NAME VALUE} (the scenario's global variables). C{prefix} goes before the command
    (e.g. C{ip netns exec NAME}).
    """

    def __init__(
        self,
        workdir: Path,
        binary: str = "sipp",
        host: str = LOOPBACK,
        prefix: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.host = host
        self.prefix = list(prefix)
        self.processes: list[SippProcess] = []
        self._counter = 0

    def _argv(
        self,
        name: str,
        scenario: str | Path,
        *,
        transport: str,
        local_port: int,
        timeout: float,
        count: int | None,
        keys: Mapping[str, str] | None,
        variables: Mapping[str, str] | None,
        extra_args: Sequence[str],
    ) -> list[str]:
        path = Path(scenario)
        if not path.is_absolute() and not path.exists():
            path = SCENARIOS / path
        argv = [
            *self.prefix,
            self.binary,
            "-sf",
            str(path),
            "-t",
            transport,
            "-i",
            self.host,
            "-p",
            str(local_port),
            "-mp",
            str(free_port(self.host)),
            "-nostdin",
            "-trace_stat",
            "-stf",
            f"{name}.csv",
            "-fd",
            "1",
            "-trace_err",
            "-error_file",
            f"{name}_errors.log",
            "-trace_screen",
            "-screen_file",
            f"{name}_screen.log",
            "-timeout",
            f"{max(1, int(timeout))}s",
            "-timeout_error",
            "-max_recv_loops",
            "10000",
        ]
        if count is not None:
            argv += ["-m", str(count)]
        for key, value in (keys or {}).items():
            argv += ["-key", key, value]
        for var, value in (variables or {}).items():
            argv += ["-set", var, value]
        argv += list(extra_args)
        return argv

    def _name(self, role: str, scenario: str | Path) -> str:
        self._counter += 1
        return f"{role}{self._counter}_{Path(scenario).stem}"

    def start_uas(
        self,
        scenario: str | Path,
        port: int,
        *,
        transport: str = "u1",
        count: int | None = None,
        keys: Mapping[str, str] | None = None,
        variables: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        extra_args: Sequence[str] = (),
    ) -> SippProcess:
        """A sipp server on C{port}, in the background; it exits after C{count} calls."""
        name = self._name("uas", scenario)
        argv = self._argv(
            name,
            scenario,
            transport=transport,
            local_port=port,
            timeout=timeout,
            count=count,
            keys=keys,
            variables=variables,
            extra_args=extra_args,
        )
        process = SippProcess(name, argv, self.workdir, timeout)
        self.processes.append(process)
        self._wait_bound(process, port, transport)
        return process

    def _wait_bound(
        self, process: SippProcess, port: int, transport: str, limit: float = 5.0
    ) -> None:
        """Until the server's port is taken (sipp has bound it), so the first INVITE finds it."""
        kind = socket.SOCK_DGRAM if transport.startswith("u") else socket.SOCK_STREAM
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if not process.running():
                result = process.wait(0)
                raise HarnessError(f"sipp server did not start\n{result.describe()}")
            with socket.socket(socket.AF_INET, kind) as s:
                try:
                    s.bind((self.host, port))
                except OSError:
                    return
            time.sleep(0.05)
        raise HarnessError(f"sipp server did not bind {self.host}:{port} within {limit} s")

    def start_uac(
        self,
        scenario: str | Path,
        target: tuple[str, int],
        *,
        transport: str = "u1",
        rate: float = 10.0,
        count: int = 1,
        local_port: int | None = None,
        keys: Mapping[str, str] | None = None,
        variables: Mapping[str, str] | None = None,
        call_duration_ms: int = 0,
        max_calls: int | None = None,
        timeout: float = 60.0,
        extra_args: Sequence[str] = (),
    ) -> SippProcess:
        """A sipp client placing C{count} calls at C{rate} per second to C{target}."""
        name = self._name("uac", scenario)
        argv = self._argv(
            name,
            scenario,
            transport=transport,
            local_port=local_port if local_port is not None else free_port(self.host),
            timeout=timeout,
            count=count,
            keys=keys,
            variables=variables,
            extra_args=[
                "-r",
                f"{rate:g}",
                "-d",
                str(call_duration_ms),
                *(["-l", str(max_calls)] if max_calls is not None else []),
                *extra_args,
            ],
        )
        host, port = target
        argv.insert(len(self.prefix) + 1, f"{host}:{port}")
        process = SippProcess(name, argv, self.workdir, timeout)
        self.processes.append(process)
        return process

    def run_uac(self, scenario: str | Path, target: tuple[str, int], **kwargs: Any) -> SippResult:
        """L{start_uac}, then wait for it (bounded by its timeout)."""
        return self.start_uac(scenario, target, **kwargs).wait()

    def cleanup(self) -> None:
        for process in self.processes:
            process.kill()

    def __enter__(self) -> Sipp:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()


def wait_started(process: subprocess.Popen[bytes], name: str, ready: Callable[[], bool],
                 limit: float, log_tail: Callable[[], str]) -> bool:
    """Poll ``ready`` every 0.1 s while ``process`` (just started) runs, for ``limit`` seconds.

    :returns: whether it became ready; the caller stops the process and says what it waited
        for when not.
    :raises HarnessError: the process exited first (with its log's tail).
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise HarnessError(f"{name} exited with {process.returncode}\n{log_tail()}")
        if ready():
            return True
        time.sleep(0.1)
    return False


def wait_for(check: Callable[[], object], limit: float = 5.0) -> None:
    """Poll ``check`` every 0.1 s until it is true or ``limit`` seconds are over; the caller
    asserts what it needs afterwards (with what it saw in the message)."""
    deadline = time.monotonic() + limit
    while not check() and time.monotonic() < deadline:
        time.sleep(0.1)
