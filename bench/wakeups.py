"""
What a datagram costs the proxy outside its SIP code: Twisted's per-datagram path, and sharing
a CPU with processes that wake up as often as sipp does under ``bench/cps``.

    python3 bench/wakeups.py echo --datagrams 30000 --batch 1,4 --repeat 3
    PYTHONPATH=$PWD python3 bench/wakeups.py neighbour --calls 6000 --touch-kib 16,256

``echo``: a UDP echo server in its own process, CPU per datagram (its ``getrusage`` while it
serves): ``raw``, a bare ``epoll`` + ``recvfrom``/``sendto`` loop; ``twisted``, the proxy's
UDP listener, :class:`~sipproxy.transport.udp.SIPDatagramProtocol` on the epoll reactor's
``udp.Port`` (``maxPacketSize`` 65535), echoing with its ``send``. The client sends ``batch``
1 KiB datagrams, then waits for their echoes: batch 1 is a reactor wake-up per datagram, 4
about what the proxy reads per wake-up at 400 cps. The difference is what Twisted and the
listener add per datagram.

``neighbour``: ``bench/calls.py`` (the proxy's Python work in-process: no sockets, no reactor)
pinned to one CPU, alone and beside a pair of processes on that CPU that wake each other
``--rate`` times a second and touch ``--touch-kib`` KiB of memory at each wake-up, a stand-in
for the sipp processes beside the proxy in ``bench/cps``. It measures how much slower the same
Python work runs when the CPU is shared with processes that come and go.

Loopback only; every loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOOPBACK = "127.0.0.1"
PAYLOAD = b"INVITE sip:service@127.0.0.1 SIP/2.0\r\nX-Pad: " + b"a" * 960 + b"\r\n\r\n"
STOP = b"STOP"
DEADLINE = 60.0  # seconds any one server or neighbour may run


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _raw_server(sock: socket.socket) -> tuple[float, int]:
    """Echo until STOP; returns the CPU seconds used and the datagrams echoed."""
    sock.setblocking(False)
    poller = select.epoll()
    poller.register(sock.fileno(), select.EPOLLIN)
    echoed = 0
    before = _cpu()
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        for _fd, _event in poller.poll(1.0):
            while True:
                try:
                    data, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                if data == STOP:
                    return _cpu() - before, echoed
                sock.sendto(data, addr)
                echoed += 1
    return _cpu() - before, echoed


def _twisted_server(sock: socket.socket) -> tuple[float, int]:
    """The same echo through the proxy's UDP listener: :class:`SIPDatagramProtocol` (its
    handler and its ``send``) on the epoll reactor, installed in this process."""
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    from sipproxy.transport.udp import SIPDatagramProtocol

    echoed = [0]

    def handle(data: bytes, addr: tuple[str, int]) -> None:
        if data == STOP:
            reactor.stop()
            return
        proto.send(data, addr)
        echoed[0] += 1

    proto = SIPDatagramProtocol(handle)
    sock.setblocking(False)
    reactor.adoptDatagramPort(  # type: ignore[attr-defined]
        sock.fileno(), socket.AF_INET, proto, maxPacketSize=65535)
    reactor.callLater(DEADLINE, reactor.stop)
    before = _cpu()
    reactor.run()
    return _cpu() - before, echoed[0]


def _echo_once(mode: str, datagrams: int, batch: int) -> float:
    """CPU microseconds per datagram of one echo server run."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    address = sock.getsockname()  # bound before the fork: the kernel queues what comes early
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server
        code = 1
        try:
            os.close(result_r)
            used, echoed = (_raw_server if mode == "raw" else _twisted_server)(sock)
            os.write(result_w, f"{used} {echoed}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(result_w)
    sock.close()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    try:
        for _ in range(datagrams // batch):
            for _ in range(batch):
                client.sendto(PAYLOAD, address)
            for _ in range(batch):
                client.recvfrom(65535)
        client.sendto(STOP, address)
        cpu_text, count_text = os.read(result_r, 100).decode().split()
    finally:
        client.close()
        os.waitpid(pid, 0)
    return float(cpu_text) * 1e6 / max(1, int(count_text))


def echo(args: argparse.Namespace) -> None:
    for batch in args.batch:
        for run in range(args.repeat):
            figures = [f"{mode} {_echo_once(mode, args.datagrams, batch):5.2f}"
                       for mode in ("raw", "twisted")]
            print(f"batch {batch} run {run + 1}: " + ", ".join(figures)
                  + " us CPU per datagram", flush=True)


def _pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def _neighbour(cpu: int, rate: int, touch_kib: int) -> int:
    """Fork the pair of waking processes, pinned to ``cpu``; returns the first one's pid (kill
    its process group to stop both; each also stops by itself after :data:`DEADLINE`)."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setpgid(0, 0)
        _pin(cpu)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        memory = bytearray(touch_kib * 1024)
        zeros = bytes(len(memory[::64]))
        end = time.monotonic() + DEADLINE
        if os.fork() == 0:  # the second one answers each wake-up
            b.settimeout(DEADLINE)
            while time.monotonic() < end:
                b.recv(8)
                memory[::64] = zeros  # one write per cache line
            os._exit(0)
        gap = 1.0 / rate
        due = time.monotonic()
        while time.monotonic() < end:
            a.send(b"x")
            memory[::64] = zeros
            due += gap
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
    finally:
        os._exit(0)


def neighbour(args: argparse.Namespace) -> None:
    calls = Path(__file__).resolve().parent / "calls.py"
    command = [sys.executable, str(calls), "--calls", str(args.calls), "--repeat", "1"]

    def measure() -> str:
        out = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE,
                             preexec_fn=lambda: _pin(args.cpu), check=True).stdout
        return out.strip().splitlines()[-1]

    for run in range(args.repeat):
        print(f"run {run + 1} alone: {measure()}", flush=True)
        for kib in args.touch_kib:
            pid = _neighbour(args.cpu, args.rate, kib)
            try:
                time.sleep(0.3)
                line = measure()
            finally:
                os.killpg(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            print(f"run {run + 1} beside {args.rate}/s x {kib} KiB: {line}", flush=True)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    e = sub.add_parser("echo", help="CPU per datagram: bare socket loop against Twisted")
    e.add_argument("--datagrams", type=int, default=30000)
    e.add_argument("--batch", type=_ints, default=[1, 4], help="datagrams in flight, e.g. 1,4")
    e.add_argument("--repeat", type=int, default=3)
    e.set_defaults(run=echo)
    n = sub.add_parser("neighbour", help="bench/calls.py alone and beside waking processes")
    n.add_argument("--calls", type=int, default=6000)
    n.add_argument("--rate", type=int, default=1500, help="the neighbour's wake-ups a second")
    n.add_argument("--touch-kib", type=_ints, default=[16, 256])
    n.add_argument("--cpu", type=int, default=0)
    n.add_argument("--repeat", type=int, default=2)
    n.set_defaults(run=neighbour)
    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
