"""Private RabbitMQ and Redis servers for tests that stop and restart them (or need TLS).

Each has its own port, node name and data directory, so a fault test never touches the
shared servers that a developer or CI runs (and the other tests use).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(n: int) -> list[int]:
    """Return `n` distinct free ports: all bound at once, so no two calls hand out the same
    one (separate free_port() calls may, once the first socket is closed)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_port(port: int, timeout_s: float, up: bool = True) -> None:
    """Wait until 127.0.0.1:port accepts connections (or, with up=False, refuses them)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} not {'up' if up else 'down'} after {timeout_s}s")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_test_certs(folder: Path) -> None:
    """Write a throwaway CA (ca.crt) and a server.crt/.key it signed for 127.0.0.1 and localhost."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is needed to make the test certificates (apt install openssl)")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=first-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=folder)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=folder)  # fmt: skip
    (folder / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-extfile", "server.ext", "-out", "server.crt",
             cwd=folder)  # fmt: skip


class PrivateRedis:
    """A redis-server child with append-only persistence in its own folder."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / f"redis-{secrets.token_hex(3)}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            shutil.which("redis-server") or "redis-server",
            "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, 10)

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        self.proc.wait(15)
        self.proc = None
        wait_port(self.port, 10, up=False)


class PrivateRabbit:
    """A RabbitMQ node of its own (name, ports, mnesia folder), no plugins.

    With `tls=True` its only AMQP listener speaks TLS, with a certificate signed by a
    throwaway CA (`ca_file`); it verifies client certificates if sent but needs none.
    """

    def __init__(self, *, tls: bool = False) -> None:
        name = secrets.token_hex(3)
        # Debian's rabbitmq-server drops to the `rabbitmq` user: its folder must be that user's,
        # outside test temp folders (which are private to root).
        self.dir = Path(tempfile.gettempdir()) / f"first-rabbit-{name}"
        self.dir.mkdir(parents=True)
        self.node = f"fault{name}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.tls = tls
        config = ["loopback_users = none"]
        if tls:
            make_test_certs(self.dir)
            config += [
                "listeners.tcp = none",
                f"listeners.ssl.default = 127.0.0.1:{self.port}",
                f"ssl_options.cacertfile = {self.ca_file}",
                f"ssl_options.certfile = {self.dir / 'server.crt'}",
                f"ssl_options.keyfile = {self.dir / 'server.key'}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        else:
            config.append(f"listeners.tcp.default = 127.0.0.1:{self.port}")
        (self.dir / "rabbitmq.conf").write_text("\n".join(config) + "\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "rabbitmq", "rabbitmq")
            for child in self.dir.iterdir():
                shutil.chown(child, "rabbitmq", "rabbitmq")

    @property
    def ca_file(self) -> Path:
        """The CA that signed the node's certificate (with `tls=True`)."""
        return self.dir / "ca.crt"

    @property
    def url(self) -> str:
        """amqp://, or with `tls=True` amqps:// naming the CA to verify the node with."""
        if self.tls:
            cafile = urllib.parse.quote(str(self.ca_file))
            return f"amqps://guest:guest@127.0.0.1:{self.port}/?cafile={cafile}"
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),  # no plain listener if the config says none
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                "RABBITMQ_PID_FILE": str(self.dir / "rabbit.pid"),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
            }
        )
        return env

    def start(self) -> None:
        env = self._env()
        subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True, timeout=60)
        pid_file = str(self.dir / "rabbit.pid")
        subprocess.run(
            ["rabbitmqctl", "-n", self.node, "wait", pid_file, "--timeout", "120"],
            env=env, check=True, timeout=150, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(self.port, 60)

    def stop(self, *, kill: bool = False) -> None:
        pid_file = self.dir / "rabbit.pid"
        if kill and pid_file.exists():
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        else:
            subprocess.run(
                ["rabbitmqctl", "-n", self.node, "stop", str(pid_file)],
                env=self._env(), check=False, timeout=60, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        wait_port(self.port, 30, up=False)
        pid_file.unlink(missing_ok=True)

    def remove(self) -> None:
        """Stop the node if it runs and delete its folder."""
        if (self.dir / "rabbit.pid").exists():
            self.stop(kill=True)
        shutil.rmtree(self.dir, ignore_errors=True)
