"""`rediss://` URLs work: a private redis-server speaking only TLS, with a throwaway CA."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.records import Chunk
from services.common import streams
from services.common.redis import make_redis
from services.gateway.streams import StreamReader
from tests.faults.privates import free_port


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server on a TLS-only port; yields its rediss:// URL (CA given in the URL)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificates (apt install openssl)")
    work = tmp_path_factory.mktemp("tls-redis")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             "/CN=first-test-ca", "-keyout", "ca.key", "-out", "ca.crt", cwd=work)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=work)  # fmt: skip
    (work / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.crt",
             cwd=work)  # fmt: skip
    port = free_port()
    argv = [
        shutil.which("redis-server") or "redis-server",
        "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(work / "server.crt"), "--tls-key-file", str(work / "server.key"),
        "--tls-ca-cert-file", str(work / "ca.crt"), "--tls-auth-clients", "no",
        "--save", "", "--dir", str(work), "--logfile", str(work / "redis.log"),
    ]  # fmt: skip
    proc = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            assert time.monotonic() < deadline, (work / "redis.log").read_text()
            time.sleep(0.1)
        yield f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={work / 'ca.crt'}&ssl_cert_reqs=required"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_services_redis_clients_speak_tls_when_given_a_rediss_url(tls_redis: str) -> None:
    client = make_redis(tls_redis)
    reader = StreamReader(tls_redis, client, block_ms=2000)
    await reader.start()
    try:
        assert await client.ping()
        sub = reader.subscribe("tls-request")
        await streams.append(client, "tls-request", Chunk(data=b"over tls"), ttl_s=60)
        assert await sub.next(timeout=5) == Chunk(data=b"over tls")
    finally:
        await reader.stop()
        await client.aclose()


async def test_a_plain_client_cannot_talk_to_the_tls_port(tls_redis: str) -> None:
    plain = make_redis(tls_redis.replace("rediss://", "redis://").split("?")[0], socket_timeout=2)
    try:
        with pytest.raises(Exception):  # noqa: B017, PT011 - any failure: it must not work
            await asyncio.wait_for(plain.ping(), 10)
    finally:
        await plain.aclose()
