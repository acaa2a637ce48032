"""Tests for sipproxy.tap and the twistd plugin: options, makeService, and real twistd runs."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.application.service import IService, Service
from twisted.python import usage

from sipproxy import tap
from sipproxy.config import Config

REPO = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
TWIST = [sys.executable, "-m", "twisted"]
TIMEOUT = 60


def run_env() -> dict[str, str]:
    """The environment for child processes: find this checkout even if it is not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=cwd,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


# ---------------------------------------------------------------- in process


def test_options_config_is_optional() -> None:
    options = tap.Options()
    options.parseOptions([])
    assert options["config"] is None


@pytest.mark.parametrize("flag", ["--config", "-c"])
def test_options_config(flag: str) -> None:
    options = tap.Options()
    options.parseOptions([flag, "/etc/sipproxy.toml"])
    assert options["config"] == "/etc/sipproxy.toml"


def test_options_refuse_arguments() -> None:
    with pytest.raises(usage.UsageError):
        tap.Options().parseOptions(["extra"])


def options_for(path: str | None) -> tap.Options:
    options = tap.Options()
    options.parseOptions([] if path is None else ["--config", path])
    return options


def test_make_service_bad_config_exits_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[listen]]\n[[listen]]\nport = "abc"\n')
    with pytest.raises(SystemExit) as info:
        tap.makeService(options_for(str(path)))
    assert info.value.code == 2
    assert info.value.__context__ is None or info.value.__suppress_context__
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f'sipproxy: {path}: listen[1].port: must be an integer from 0 to 65535, got "abc"\n'
    )


def test_make_service_missing_file_exits_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(SystemExit) as info:
        tap.makeService(options_for(str(path)))
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"sipproxy: {path}: cannot read config file: No such file or directory\n"
    )


@pytest.fixture
def fake_service_module(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Record what tap hands sipproxy.service.makeService (no sockets are opened), and keep
    the test process's garbage collector settings as they are."""
    import sipproxy.service

    received: list[Config] = []

    def makeService(config: Config) -> IService:
        received.append(config)
        return Service()

    monkeypatch.setattr(sipproxy.service, "makeService", makeService)
    monkeypatch.setattr(sipproxy.service, "tune_garbage_collector", lambda: None)
    return received


def test_make_service_passes_the_loaded_config(
    tmp_path: Path, fake_service_module: list[Config]
) -> None:
    path = tmp_path / "good.toml"
    path.write_text('[proxy]\ndomains = ["lan.example"]\n[nat]\nkeepalive = 15\n')
    service = tap.makeService(options_for(str(path)))
    assert isinstance(service, Service)
    (config,) = fake_service_module
    assert config.source == str(path)
    assert config.proxy.domains == ("lan.example",)
    assert config.section("nat").get_int("keepalive") == 15


def test_make_service_without_config_uses_defaults(fake_service_module: list[Config]) -> None:
    tap.makeService(options_for(None))
    assert fake_service_module == [Config()]


# ---------------------------------------------------------------- real twistd processes


def test_twistd_lists_the_plugin(tmp_path: Path) -> None:
    result = run([*TWISTD, "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert any(words[:1] == ["sipproxy"] for words in lines), result.stdout


def test_twistd_sipproxy_help(tmp_path: Path) -> None:
    result = run([*TWISTD, "sipproxy", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--config=" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


BAD_CONFIGS = [
    (
        '[[listen]]\n[[listen]]\nport = "abc"\n',
        'listen[1].port: must be an integer from 0 to 65535, got "abc"',
    ),
    ('[upstream]\nuri = "http://x"\n', 'upstream.uri: must be a sip: or sips: URI, got "http://x"'),
    ("[proxy]\nrecord_route = true\nrecord_route = 1\n\n[timers]\n", "line 3, column 17: "),
    ("[timers]\nt0 = 1\n", "timers.t0: unknown key"),
    # errors found while the plugins and listeners are built name the file too
    ('[plugins]\nenabled = ["nta"]\n', "plugins.enabled: no plugin named 'nta' is installed"),
    # a misspelt table is not silently ignored
    ("[limit]\nenabled = false\n", "limit: unknown table"),
    ('[upstream]\nuri = "sip:provider.example;transport=sctp"\n',
     "upstream.uri: must have ;transport=udp, tcp or tls"),
    ('[upstream]\nuri = "sips:provider.example"\n',
     'upstream.uri: a TLS upstream needs the tls plugin (add "tls" to plugins.enabled)'),
    # the admin listener on a public address without a token: anyone could see every call
    ('[admin]\naddress = "0.0.0.0"\n', "admin.token: is required to listen on 0.0.0.0"),
]


@pytest.mark.parametrize("launcher", ["twistd", "twist"])
@pytest.mark.parametrize(("text", "blamed"), BAD_CONFIGS, ids=[b[1][:30] for b in BAD_CONFIGS])
def test_bad_config_one_line_no_traceback(
    tmp_path: Path, launcher: str, text: str, blamed: str
) -> None:
    path = tmp_path / "BAD.toml"
    path.write_text(text)
    args = [*TWISTD, "-n"] if launcher == "twistd" else TWIST
    result = run([*args, "sipproxy", "--config", str(path)], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"sipproxy: {path}: {blamed}")
    assert result.stdout == ""
    assert not (tmp_path / "twistd.pid").exists()


def test_missing_config_one_line_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    result = run([*TWISTD, "-n", "sipproxy", "-c", str(path)], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert (
        result.stderr == f"sipproxy: {path}: cannot read config file: No such file or directory\n"
    )


def test_daemon_mode_reports_before_forking(tmp_path: Path) -> None:
    """Without -n, twistd would daemonize; the error must still reach the terminal."""
    path = tmp_path / "BAD.toml"
    path.write_text("[proxy]\nmax_forwards = 0\n")
    result = run([*TWISTD, "sipproxy", "--config", str(path)], tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        f"sipproxy: {path}: proxy.max_forwards: must be an integer from 1 to 255, got 0\n"
    )
    assert not (tmp_path / "twistd.pid").exists()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.integration
@pytest.mark.skipif(
    importlib.util.find_spec("sipproxy.service") is None,
    reason="sipproxy.service (makeService(config)) is not written yet",
)
def test_good_config_runs_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "good.toml"
    path.write_text(
        f"""
        [[listen]]
        transport = "udp"
        address = "127.0.0.1"
        port = {port}
        [[listen]]
        transport = "tcp"
        address = "127.0.0.1"
        port = {port}
        """
    )
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile", "", "sipproxy", "--config", str(path)],
            cwd=tmp_path,
            env=run_env(),
            stdout=stdout,
            stderr=stderr,
        )
        try:
            listening = False
            deadline = time.monotonic() + 30
            while not listening and proc.poll() is None and time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    listening = True
                except OSError:
                    time.sleep(0.1)
            assert listening, f"rc={proc.poll()} {err.read_text()} {out.read_text()}"
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    logs = out.read_text() + err.read_text()
    # twistd re-raises the signal that stopped it, so a clean SIGTERM stop ends with -SIGTERM.
    assert rc in (0, -signal.SIGTERM), logs
    assert "Server Shut Down." in logs
    assert "Traceback" not in logs


def test_port_in_use_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        config = tmp_path / "busy.toml"
        config.write_text(
            f'[[listen]]\ntransport = "udp"\naddress = "127.0.0.1"\nport = {port}\n'
        )
        result = run([*TWISTD, "-n", "--pidfile=", "sipproxy", "--config", str(config)],
                     tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert f"sipproxy: cannot listen on 127.0.0.1:{port}: Address already in use" in output
    assert "Traceback" not in output
