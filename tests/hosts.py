"""Hosts as network namespaces: a Dask cluster of several machines on one, for ``test_hosts.py``.

::

    namespace <p>-net: bridge br0 --+-- <p>-sched  10.77.N.1   dask scheduler
                                    +-- <p>-a      10.77.N.2   dask worker (with a nanny)
                                    +-- <p>-b      10.77.N.3   dask worker (with a nanny) known by a
                                    |                          name its own /etc/hosts maps to 127.0.1.1
                                    +-- this process (a veth <p>c in the root namespace, 10.77.N.254)
    <p>-out  10.78.N.2 --veth-- <p>-sched (10.78.N.1, no forwarding): reaches the scheduler only

Needs root and iproute2; :func:`skip_reason` says why not. Each run takes its own prefix ``<p>``
(``zq`` and 5 hex digits) and its own subnet ``N``, so parallel runs do not collide, and
:meth:`Hosts.close` removes everything it made, whatever failed: every process in its namespaces (by
pid), the namespaces (and with them their veths and the bridge), the veth of this process, and
``/etc/netns/<namespace>/`` (``ip netns exec`` mounts a namespace's ``hosts`` file from there).
Processes are real ``dask scheduler`` / ``dask worker`` commands run with ``ip netns exec``, with
``PYTHONPATH`` pointing at this checkout. Traffic goes only to the namespaces made here.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = str(Path(__file__).resolve().parent.parent)
SCHEDULER_PORT = 8786
#: Host b's worker listens here, on every address of its namespace, and names itself by NAME.
B_PORT = 40123


def skip_reason() -> str | None:
    """Why namespaces cannot be made here (None if they can)."""
    if os.geteuid() != 0:
        return "network namespaces as hosts need root"
    if shutil.which("ip") is None:
        return "network namespaces as hosts need iproute2 (the ip command)"
    probe = f"zq{os.urandom(3).hex()[:5]}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


class Hosts:
    """A scheduler and two worker hosts on a bridge; :meth:`close` undoes everything."""

    def __init__(self, logs: Path, *, tls: bool = False) -> None:
        self.prefix = f"zq{os.urandom(3).hex()[:5]}"
        self.logs = logs
        #: With ``tls=True`` the cluster speaks ``tls://`` (one temporary certificate, written
        #: under ``logs``); a client needs :attr:`security`.
        self.security: Any = None
        self._tls_args: list[str] = []
        if tls:
            self.security, self._tls_args = self._certificates(logs)
        self.protocol = "tls" if tls else "tcp"
        self.subnet = self._free_subnet()
        self.sched_ip = f"10.77.{self.subnet}.1"
        self.a_ip = f"10.77.{self.subnet}.2"
        self.b_ip = f"10.77.{self.subnet}.3"
        self.client_ip = f"10.77.{self.subnet}.254"
        #: Host b's worker's name: on b it resolves to 127.0.1.1 (Debian's habit), elsewhere to b.
        self.b_name = f"{self.prefix}-node-b"
        self.scheduler = f"{self.protocol}://{self.sched_ip}:{SCHEDULER_PORT}"
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._client_veth = f"{self.prefix}c"
        self._made_etc_netns = not Path("/etc/netns").exists()

    @staticmethod
    def _certificates(folder: Path) -> tuple[Any, list[str]]:
        """A temporary certificate, its own authority, as files for the dask commands; and the
        client's :class:`~distributed.Security` that trusts it."""
        from distributed.security import Security

        made = Security.temporary()
        files = {}
        for name, text in (("ca.pem", made.tls_ca_file), ("cert.pem", made.tls_scheduler_cert),
                           ("key.pem", made.tls_scheduler_key)):
            path = folder / name
            path.write_text(text)
            files[name] = str(path)
        args = ["--tls-ca-file", files["ca.pem"], "--tls-cert", files["cert.pem"], "--tls-key", files["key.pem"]]
        return made, args

    @staticmethod
    def _free_subnet() -> int:
        taken = _ip("-4", "addr").stdout + _ip("-4", "route").stdout
        for _ in range(100):
            n = random.randrange(16, 250)
            if f"10.77.{n}." not in taken and f"10.78.{n}." not in taken:
                return n
        raise RuntimeError("no free 10.77.N.0/24 subnet for the test hosts")

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    # -- building ------------------------------------------------------------------------------
    def start(self) -> Hosts:
        net = self._namespace("net")
        _ip("-n", net, "link", "add", "br0", "type", "bridge")
        _ip("-n", net, "link", "set", "dev", "br0", "up")
        for name, address in (("sched", self.sched_ip), ("a", self.a_ip), ("b", self.b_ip)):
            self._namespace(name)
            self._plug(name, address)
        _ip("link", "add", self._client_veth, "type", "veth", "peer", "name", "to-client", "netns", net)
        _ip("-n", net, "link", "set", "dev", "to-client", "master", "br0", "up")
        _ip("addr", "add", f"{self.client_ip}/24", "dev", self._client_veth)
        _ip("link", "set", "dev", self._client_veth, "up")
        self._hosts_file("b", f"127.0.0.1 localhost\n127.0.1.1 {self.b_name}\n")
        self._hosts_file("sched", f"127.0.0.1 localhost\n{self.b_ip} {self.b_name}\n")
        self._hosts_file("a", f"127.0.0.1 localhost\n{self.b_ip} {self.b_name}\n")
        tls, protocol = self._tls_args, self.protocol
        scheduler = ["scheduler", "--host", self.sched_ip, "--port", str(SCHEDULER_PORT), "--no-dashboard"]
        self.run("sched", [*scheduler, *(["--protocol", "tls", *tls] if tls else [])])
        common = ["worker", self.scheduler, "--nthreads", "1", "--no-dashboard", "--death-timeout", "60", *tls]
        self.run("a", [*common, "--name", "a", "--host", self.a_ip])
        self.run(
            "b",
            [
                *common, "--name", "b",
                "--listen-address", f"{protocol}://0.0.0.0:{B_PORT}",
                "--contact-address", f"{protocol}://{self.b_name}:{B_PORT}",
            ],
        )
        return self

    def _namespace(self, name: str) -> str:
        ns = self.ns(name)
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("-n", ns, "link", "set", "dev", "lo", "up")
        return ns

    def _plug(self, name: str, address: str, prefix: int = 24) -> None:
        """A veth from host ``name`` (its eth0, at ``address``) to the bridge."""
        ns, net = self.ns(name), self.ns("net")
        port = f"to-{name}"
        _ip("link", "add", f"{self.prefix}{name}", "netns", ns, "type", "veth", "peer", "name", port, "netns", net)
        _ip("-n", ns, "link", "set", "dev", f"{self.prefix}{name}", "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "dev", "eth0", "up")
        _ip("-n", net, "link", "set", "dev", port, "master", "br0", "up")

    def _hosts_file(self, name: str, text: str) -> None:
        folder = Path("/etc/netns") / self.ns(name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text(text)

    def outside(self) -> str:
        """A namespace that reaches the scheduler and nothing else: routed through the scheduler's
        host, which does not forward, so packets to the workers are dropped (as a cloud firewall
        would), not refused. Returns its name (made once; later calls return it)."""
        if self.ns("out") in self._namespaces:
            return self.ns("out")
        out, sched = self._namespace("out"), self.ns("sched")
        _ip("link", "add", f"{self.prefix}o", "netns", out, "type", "veth", "peer", "name", "eth1", "netns", sched)
        _ip("-n", out, "link", "set", "dev", f"{self.prefix}o", "name", "eth0")
        _ip("-n", out, "addr", "add", f"10.78.{self.subnet}.2/30", "dev", "eth0")
        _ip("-n", out, "link", "set", "dev", "eth0", "up")
        _ip("-n", sched, "addr", "add", f"10.78.{self.subnet}.1/30", "dev", "eth1")
        _ip("-n", sched, "link", "set", "dev", "eth1", "up")
        _ip("-n", out, "route", "add", f"10.77.{self.subnet}.0/24", "via", f"10.78.{self.subnet}.1")
        forwarding = subprocess.run(
            ["ip", "netns", "exec", sched, "cat", "/proc/sys/net/ipv4/ip_forward"], capture_output=True, text=True
        ).stdout.strip()
        assert forwarding == "0", f"the scheduler's namespace forwards packets ({forwarding})"
        return out

    def block(self, name: str, address: str) -> None:
        """Host ``name`` has no route to ``address`` (both directions of TCP break)."""
        _ip("-n", self.ns(name), "route", "add", "unreachable", f"{address}/32")

    def unblock(self, name: str, address: str) -> None:
        _ip("-n", self.ns(name), "route", "del", "unreachable", f"{address}/32", check=False)

    # -- processes -----------------------------------------------------------------------------
    def run(self, name: str, dask_args: list[str]) -> subprocess.Popen[bytes]:
        """``dask <dask_args>`` in host ``name``'s namespace, logging to ``<logs>/<name>.log``."""
        return self.popen(name, [sys.executable, "-m", "dask", *dask_args], self.logs / f"{name}.log")

    def popen(self, name: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(name), *argv],
                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # -- undoing -------------------------------------------------------------------------------
    def _wait_dead(self, pids: set[int], timeout: float) -> None:
        """Until every one of ``pids`` has died (our children reaped), or ``timeout`` (then the next
        round of close() looks again): a look too early would miss what a nanny starts next."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self._procs:
                proc.poll()  # reaps a child that died: a zombie is not alive
            if not any(_alive(pid) for pid in pids):
                return
            time.sleep(0.02)  # a poll interval: what ends the wait is the processes' state

    def close(self) -> None:
        """Kill every process in the namespaces, then remove what was made. Never raises."""
        for _ in range(3):  # a nanny may start a worker while we kill: look again
            pids = {p.pid for p in self._procs if p.poll() is None}
            for ns in self._namespaces:
                listed = _ip("netns", "pids", ns, check=False).stdout.split()
                pids.update(int(pid) for pid in listed if pid.isdigit())
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._wait_dead(pids, timeout=10)
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self._namespaces):
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        _ip("link", "del", self._client_veth, check=False)
        if self._made_etc_netns:
            try:
                Path("/etc/netns").rmdir()  # made here; left if anything else is in it now
            except OSError:
                pass
        self._namespaces.clear()
        self._procs.clear()
