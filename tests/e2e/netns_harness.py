"""Two network namespaces joined by a veth pair: two "hosts" on one machine for the multi-host test.

    namespace <name>-a  veth <dev>a  10.203.<n>.2/24  (the expert shard's host)
    namespace <name>-b  veth <dev>b  10.203.<n>.1/24  (the router's host, with batcher, tokenizer and gateway)

Each namespace has only its loopback and its end of the veth: traffic between the two crosses the veth, nothing
reaches the outside. The names and the subnet carry this process's id, so concurrent runs do not collide, and
remove() deletes both namespaces (and with them the veth) also after a failure. Needs CAP_NET_ADMIN (root in CI):
without it the set-up raises NetnsRefused with what the kernel said.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from moemesh.serving.supervisor import _die_with_parent


class NetnsRefused(AssertionError):
    """The kernel (or a missing `ip`) refused to create the namespaces; the message says which command and why."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise NetnsRefused(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}. The multi-host "
                           f"test creates network namespaces and needs root or CAP_NET_ADMIN (uid {os.getuid()}).")


@dataclass
class TwoHosts:
    tag: str = field(default_factory=lambda: f"mm{os.getpid() % 100000}")
    subnet: int = field(default_factory=lambda: 1 + os.getpid() % 250)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def shard_ns(self) -> str:
        return f"{self.tag}-a"

    @property
    def router_ns(self) -> str:
        return f"{self.tag}-b"

    @property
    def shard_ip(self) -> str:
        return f"10.203.{self.subnet}.2"

    @property
    def router_ip(self) -> str:
        return f"10.203.{self.subnet}.1"

    def create(self) -> None:
        if shutil.which("ip") is None:
            raise NetnsRefused("`ip` (iproute2) is not installed: `make install` installs it as root")
        dev_a, dev_b = f"{self.tag}a", f"{self.tag}b"  # interface names: at most 15 characters
        _ip("netns", "add", self.shard_ns)
        _ip("netns", "add", self.router_ns)
        _ip("link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
        for ns, dev, ip in ((self.shard_ns, dev_a, self.shard_ip), (self.router_ns, dev_b, self.router_ip)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")  # the services of one host talk over 127.0.0.1

    def start(self, ns: str, args: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
        """`ip netns exec NS args...` (ip execs the command: the Popen pid is the service's own)."""
        with log.open("w") as out:  # dies with the test process even when that is SIGKILLed
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=cwd,
                                    preexec_fn=_die_with_parent(os.getpid()))
        self.procs.append(proc)
        return proc

    def run(self, ns: str, args: list[str], env: dict[str, str], timeout: float,
            cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, *args], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)

    def remove(self) -> None:
        """Stops the processes this harness started, then deletes both namespaces (which deletes the veth)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for ns in (self.shard_ns, self.router_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def wait_ready(ready_files: dict[str, Path], procs: dict[str, subprocess.Popen], logs: dict[str, Path],
               timeout_s: float) -> None:
    """Until every service wrote its ready file (SERVING); fails with the log tail of one that exited or lagged."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{logs[name].read_text()[-3000:]}")
        if all(path.exists() for path in ready_files.values()):
            return
        time.sleep(0.3)
    late = [n for n, p in ready_files.items() if not p.exists()]
    raise AssertionError(f"not SERVING after {timeout_s} s: {late}\n" +
                         "\n".join(f"--- {n}:\n{logs[n].read_text()[-2000:]}" for n in late))
