"""A hub for the tunnel's tests: Debian's sshd in a network namespace of the test's own.

Choice made (issue 13): **a namespace for the hub, shifted ports for the node.**
The hub side (sshd on ``127.0.0.1:443``, listeners playing qemu-nbd on the
NBD ports, the hub API's ``/health``, its reverse port ``9081``) runs in a
network namespace that holds only ``lo``, made by a holder process
(``unshare -n sleep infinity``) that every other hub process joins with
``nsenter -t PID -n``.  The node's ssh reaches it through a ProxyCommand
``nsenter -t PID -n socat - TCP:127.0.0.1:%p``, so every forward string keeps
its production shape ``127.0.0.1:P:127.0.0.1:P``.  The node (twistd and its
ssh) runs in the test's own namespace, whose loopback this machine shares
with other programs: the tests give it a small range of free ports instead
of 10100-10200 and 8082 (the hub's listeners use the same numbers in its
namespace).  The reverse port is 9081 itself: it lives in the hub's namespace.
tests/integration/test_enrollment_tunnel.py puts the node in a namespace of
its own too, and runs every production number there.

sshd logs in as the test's own user, root, with ``AuthorizedKeysFile`` in
the test's temporary directory (``StrictModes no``, ``PermitRootLogin
prohibit-password``, a ``Match User root`` block): no user is created and
``/etc`` is not touched.  Every process of the namespace (sshd, its
sessions, socat, the listeners) and the holder are killed by pid in
:meth:`SshHub.close`, which the fixture calls even when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from tests.integration.harness import REPO, wait_for

SSHD = "/usr/sbin/sshd"
#: The hub's ports inside its namespace, as on a real hub.
SSH_PORT = 443
REVERSE_PORT = 9081


def missing_tools() -> Optional[str]:
    """Why this machine cannot run the hub, or None."""
    if os.geteuid() != 0:
        return "the SSH hub needs root (a network namespace, and sshd switching to its user)"
    if not os.path.exists(SSHD):
        return f"{SSHD} is missing (Debian's openssh-server: make deps)"
    for tool in ("ssh", "ssh-keygen", "unshare", "nsenter", "socat", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (make deps installs it)"
    return None


def key_line(public_key: str, nbd_ports: range, sha_api_port: int) -> str:
    """The authorized_keys line of docs/operations.md "Hub-side SSH setup"."""
    opens = [*nbd_ports, sha_api_port]
    permits = ",".join(f'permitopen="127.0.0.1:{p}"' for p in opens)
    return (
        f'restrict,port-forwarding,{permits},permitlisten="127.0.0.1:{REVERSE_PORT}",'
        f'command="/usr/sbin/nologin" {public_key}'
    )


class SshHub:
    """The hub: its namespace, sshd, host key, the node's key, and its listeners."""

    def __init__(
        self, root: Path, nbd_ports: range, sha_api_port: int, permit_nbd: bool = True
    ) -> None:
        self.root = root
        self.nbd_ports = nbd_ports
        self.sha_api_port = sha_api_port
        self.permit_nbd = permit_nbd
        self.holder: Optional[subprocess.Popen[bytes]] = None
        self.sshd: Optional[subprocess.Popen[bytes]] = None
        self.services: Optional[subprocess.Popen[bytes]] = None
        self.made_privsep_dir = False
        self.sshd_runs = 0
        root.mkdir(parents=True, exist_ok=True)
        self.records = root / "received"
        self.records.mkdir(exist_ok=True)
        self.host_key = root / "hub_host_ed25519"
        self.node_key = root / "node_ed25519"
        self.authorized_keys = root / "authorized_keys"
        self.config = root / "sshd_config"
        self.known_hosts = root / "known_hosts"

    # -- setting up ------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.holder is not None
        return self.holder.pid

    @property
    def proxy_command(self) -> str:
        return f"nsenter -t {self.pid} -n socat - TCP:127.0.0.1:%p"

    def start(self) -> SshHub:
        self.holder = subprocess.Popen(
            ["unshare", "-n", "sleep", "infinity"], stdin=subprocess.DEVNULL
        )
        wait_for(
            lambda: os.readlink(f"/proc/{self.pid}/ns/net") != os.readlink("/proc/self/ns/net"),
            "the hub's network namespace",
            10,
        )
        self.run_inside("ip", "link", "set", "lo", "up")
        for key in (self.host_key, self.node_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.name, "-f", str(key)],
                check=True,
            )
        self.node_key.chmod(0o600)
        self.pin(self.host_key)
        self.authorize()
        self.write_config()
        if not os.path.isdir("/run/sshd"):  # sshd's privilege separation directory
            os.makedirs("/run/sshd", mode=0o755)
            self.made_privsep_dir = True
        self.start_sshd()
        self.start_services()
        return self

    def pin(self, host_key: Path) -> None:
        """known_hosts for the node: ``[127.0.0.1]:443`` and that key's public half."""
        kind, blob = Path(f"{host_key}.pub").read_text().split()[:2]
        self.known_hosts.write_text(f"[127.0.0.1]:{SSH_PORT} {kind} {blob}\n")

    def authorize(self) -> None:
        public = Path(f"{self.node_key}.pub").read_text().strip()
        line = key_line(public, self.nbd_ports, self.sha_api_port)
        self.authorized_keys.write_text(line + "\n")

    def revoke(self) -> None:
        self.authorized_keys.write_text("")

    def write_config(self) -> None:
        opens = [*(self.nbd_ports if self.permit_nbd else ()), self.sha_api_port]
        self.config.write_text(
            "\n".join(
                [
                    f"ListenAddress 127.0.0.1:{SSH_PORT}",
                    f"HostKey {self.host_key}",
                    "PidFile none",
                    "StrictModes no",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "PermitRootLogin prohibit-password",
                    "ClientAliveInterval 5",
                    "ClientAliveCountMax 2",
                    "LogLevel VERBOSE",
                    "Match User root",
                    "  AllowTcpForwarding yes",
                    "  PermitOpen " + " ".join(f"127.0.0.1:{p}" for p in opens),
                    f"  PermitListen 127.0.0.1:{REVERSE_PORT}",
                    "  ForceCommand /usr/sbin/nologin",
                    "  PermitTTY no",
                    "  X11Forwarding no",
                    "  AllowAgentForwarding no",
                    "  AllowStreamLocalForwarding no",
                    "  GatewayPorts no",
                    "",
                ]
            )
        )

    def start_sshd(self) -> None:
        self.sshd_runs += 1
        log = self.root / f"sshd-{self.sshd_runs}.log"
        with log.open("wb") as out:
            self.sshd = subprocess.Popen(
                ["nsenter", "-t", str(self.pid), "-n", SSHD, "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(
            lambda: "Server listening" in log.read_text() or self._sshd_died(log),
            "the hub's sshd to listen",
            10,
        )

    def _sshd_died(self, log: Path) -> bool:
        if self.sshd is not None and self.sshd.poll() is not None:
            pytest.fail(f"sshd exited with {self.sshd.returncode}:\n{log.read_text()}")
        return False

    def start_services(self) -> None:
        self.services = subprocess.Popen(
            [
                "nsenter",
                "-t",
                str(self.pid),
                "-n",
                sys.executable,
                str(REPO / "tests" / "integration" / "sshhub_services.py"),
                "--nbd-ports",
                f"{self.nbd_ports.start}-{self.nbd_ports.stop - 1}",
                "--api-port",
                str(self.sha_api_port),
                "--record",
                str(self.records),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert self.services.stdout is not None
        ready = self.services.stdout.readline()
        assert ready == b"ready\n", f"the hub's listeners did not start: {ready!r}"

    # -- acting on it ------------------------------------------------------

    def run_inside(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-n", *argv],
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def get_inside(self, url: str) -> tuple[int, bytes]:
        """GET ``url`` from the hub's namespace (its 127.0.0.1)."""
        script = (
            "import sys, urllib.request, urllib.error\n"
            "try:\n"
            "    r = urllib.request.urlopen(sys.argv[1], timeout=10)\n"
            "    code, body = r.status, r.read()\n"
            "except urllib.error.HTTPError as e:\n"
            "    code, body = e.code, e.read()\n"
            "sys.stdout.write(str(code) + '\\n')\n"
            "sys.stdout.flush()\n"
            "sys.stdout.buffer.write(body)\n"
        )
        out = self.run_inside(sys.executable, "-c", script, url).stdout
        code, _, body = out.partition(b"\n")
        return int(code), body

    def received(self, port: int) -> bytes:
        path = self.records / f"port-{port}"
        return path.read_bytes() if path.exists() else b""

    def namespace_pids(self) -> list[int]:
        """Every process in the hub's namespace but the holder (sshd, sessions, socat...)."""
        if self.holder is None or self.holder.poll() is not None:
            return []
        ns = os.readlink(f"/proc/{self.pid}/ns/net")
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.pid:
                continue
            try:
                if os.readlink(entry / "ns" / "net") == ns:
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def sshd_pids(self) -> list[int]:
        """sshd's listener and every session process of it, in the hub's namespace."""
        pids = []
        for pid in self.namespace_pids():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm == "sshd":
                pids.append(pid)
        return pids

    def sessions(self) -> list[int]:
        listener = self.sshd.pid if self.sshd is not None else None
        return [pid for pid in self.sshd_pids() if pid != listener]

    def kill_sessions(self) -> None:
        """End every live SSH session (a revoked key's session survives otherwise)."""
        _kill(self.sessions())

    def stop_sshd(self) -> None:
        """Kill sshd and its sessions, as a hub that goes down would."""
        _kill(self.sshd_pids())
        if self.sshd is not None:
            self.sshd.wait(10)

    def close(self) -> None:
        """Kill everything of the hub by pid; never fails."""
        try:
            for _ in range(3):
                pids = self.namespace_pids()
                if not pids:
                    break
                _kill(pids)
            for process in (self.sshd, self.services, self.holder):
                if process is not None and process.poll() is None:
                    process.kill()
                if process is not None:
                    try:
                        process.wait(10)
                    except subprocess.TimeoutExpired:
                        pass
        finally:
            if self.made_privsep_dir:
                shutil.rmtree("/run/sshd", ignore_errors=True)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + 10
    while time.monotonic() < end and any(_alive(pid) for pid in pids):
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[-1].split()[:1] != [b"Z"]
