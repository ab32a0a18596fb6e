"""Two "hosts" on this machine for multi-worker tests and measurements: two network namespaces joined by a
veth pair (10.250.0.1/24 and 10.250.0.2/24), each worker with a network stack of its own; iptables rules
inside them cut the link (a partition) or drop a share of its packets; a user-space TCP proxy delays
traffic (the kernel has no netem).

Needs root, `ip` and `iptables`. Traffic goes only to loopback and to the addresses made here.

    python -m tests.nethosts --delay-ms 20 -- --arch cnn --epochs 1

trains across the two hosts with that one-way delay (or `--loss 0.02`) and prints the run's ms per step.
Used by tests/test_hosts.py, and for the figures in docs/distributed.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.250.0"
# The addresses workers advertise when traffic goes through the delay proxies (on each host's loopback).
PROXY_SUBNET = "10.250.1"


def missing_tools() -> Optional[str]:
    """Why two namespace hosts cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    absent = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    return f"missing {' and '.join(absent)} (apt-get install iproute2 iptables)" if absent else None


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)


class Hosts:
    """Namespaces `<prefix>a` (10.250.0.1) and `<prefix>b` (10.250.0.2); `exec(i, cmd)` runs a command on host i."""

    def __init__(self, prefix: Optional[str] = None) -> None:
        self.prefix = prefix or f"mk{os.getpid() % 100000}"
        self.names = [f"{self.prefix}a", f"{self.prefix}b"]
        self.addresses = [f"{SUBNET}.1", f"{SUBNET}.2"]

    def up(self) -> "Hosts":
        veth = [f"{self.prefix}va", f"{self.prefix}vb"]
        for name in self.names:
            _run("ip", "netns", "add", name)
        _run("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for name, device, address in zip(self.names, veth, self.addresses):
            _run("ip", "link", "set", device, "netns", name)
            _run("ip", "-n", name, "addr", "add", f"{address}/24", "dev", device)
            _run("ip", "-n", name, "link", "set", device, "up")
            _run("ip", "-n", name, "link", "set", "lo", "up")
        return self

    def down(self) -> None:
        """Deleting a namespace deletes its veth end (so the pair) and its iptables rules."""
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def exec_command(self, host: int, command: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[host], *command]

    def partition(self) -> None:
        """Drop every packet between the two hosts (both directions, on both)."""
        for host in (0, 1):
            peer = self.addresses[1 - host]
            _run(*self.exec_command(host, ["iptables", "-I", "INPUT", "-s", peer, "-j", "DROP"]))
            _run(*self.exec_command(host, ["iptables", "-I", "OUTPUT", "-d", peer, "-j", "DROP"]))

    def heal(self) -> None:
        for host in (0, 1):
            subprocess.run(self.exec_command(host, ["iptables", "-F"]), capture_output=True)

    def lose(self, probability: float) -> None:
        """Drop each packet arriving on either host with this probability."""
        for host in (0, 1):
            _run(*self.exec_command(host, ["iptables", "-I", "INPUT", "-s", self.addresses[1 - host], "-m",
                                           "statistic", "--mode", "random", "--probability", str(probability),
                                           "-j", "DROP"]))

    def add_proxy_addresses(self) -> list[str]:
        """Each host gets both proxy addresses on its loopback: its own (where it listens) and its peer's
        (where its delay proxy to the peer listens)."""
        proxied = [f"{PROXY_SUBNET}.1", f"{PROXY_SUBNET}.2"]
        for host in (0, 1):
            for address in proxied:
                _run(*self.exec_command(host, ["ip", "addr", "add", f"{address}/32", "dev", "lo"]))
        return proxied


@contextlib.contextmanager
def two_hosts() -> Iterator[Hosts]:
    hosts = Hosts()
    try:
        yield hosts.up()
    finally:
        hosts.down()


# -- a TCP proxy that delays each direction by a fixed time -------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if data is None:
                break
            await asyncio.sleep(max(due - time.monotonic(), 0))
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.ensure_future(send())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((time.monotonic() + delay, data))
    except ConnectionError:
        pass
    queue.put_nowait((0, None))
    with contextlib.suppress(ConnectionError):
        await sender


async def _serve_proxy(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer, delay), _pipe(up_reader, writer, delay))

    server = await asyncio.start_server(handle, *listen)
    async with server:
        await server.serve_forever()


def proxy_main(listen: str, target: str, delay_ms: float) -> None:
    """`python -m tests.nethosts --proxy LISTEN TARGET MS`: one delay proxy (run inside a host)."""
    def split(address: str) -> tuple[str, int]:
        host, _, port = address.rpartition(":")
        return host, int(port)
    asyncio.run(_serve_proxy(split(listen), split(target), delay_ms / 1000))


# -- a two-host training run ----------------------------------------------------------------------------


def tf_configs(addresses: Sequence[str], ports: Sequence[int]) -> list[str]:
    cluster = {"worker": [f"{address}:{port}" for address, port in zip(addresses, ports)]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}) for index in (0, 1)]


def start_workers(hosts: Hosts, train_args: Sequence[str], logs: Sequence[Path], delay_ms: float = 0.0,
                  ports: Sequence[int] = (23456, 23457), env: Optional[dict] = None) -> list[subprocess.Popen]:
    """Worker i on host i, output to logs[i]; with a delay, every connection between them goes through a
    proxy on the connecting host (so each direction is delayed once)."""
    env = {**(env or os.environ), "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    addresses = hosts.addresses
    processes = []
    if delay_ms:
        addresses = hosts.add_proxy_addresses()
        for host in (0, 1):
            peer = 1 - host
            processes.append(subprocess.Popen(hosts.exec_command(host, [
                sys.executable, "-m", "tests.nethosts", "--proxy", f"{addresses[peer]}:{ports[peer]}",
                f"{hosts.addresses[peer]}:{ports[peer]}", str(delay_ms)]), cwd=REPO_ROOT, env=env))
    workers = []
    for host, tf_config in enumerate(tf_configs(addresses, ports)):
        with open(logs[host], "w") as log:
            workers.append(subprocess.Popen(
                hosts.exec_command(host, [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), *train_args]),
                env={**env, "TF_CONFIG": tf_config}, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT))
    threading.Thread(target=_reap_proxies, args=(workers, processes), daemon=True).start()
    return workers


def _reap_proxies(workers: Sequence[subprocess.Popen], proxies: Sequence[subprocess.Popen]) -> None:
    for worker in workers:
        worker.wait()
    for proxy in proxies:
        proxy.kill()
        proxy.wait()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.nethosts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=0.0, help="One-way delay between the hosts.")
    parser.add_argument("--loss", type=float, default=0.0, help="Share of packets dropped on arrival.")
    parser.add_argument("--proxy", nargs=3, metavar=("LISTEN", "TARGET", "MS"), help=argparse.SUPPRESS)
    parser.add_argument("train_args", nargs="*", help="train.py's flags (after --).")
    args = parser.parse_args(argv)
    if args.proxy:
        proxy_main(args.proxy[0], args.proxy[1], float(args.proxy[2]))
        return 0
    if missing_tools():
        print(f"python -m tests.nethosts: error: {missing_tools()}", file=sys.stderr)
        return 2
    with two_hosts() as hosts:
        if args.loss:
            hosts.lose(args.loss)
        folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"nethosts-{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)
        logs = [folder / f"worker-{index}.log" for index in (0, 1)]
        codes = [worker.wait() for worker in start_workers(hosts, args.train_args, logs, args.delay_ms)]
        lines = logs[0].read_text().splitlines()
        print("\n".join(line for line in lines if "ms/step" in line or "test accuracy" in line or "error" in line))
        print(f"delay {args.delay_ms:g} ms, loss {args.loss:g}: exit statuses {codes}")
        shutil.rmtree(folder, ignore_errors=True)
        return max(codes)


if __name__ == "__main__":
    sys.exit(main())
