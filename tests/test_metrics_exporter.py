"""The /metrics exporter over real loopback HTTP(S): plain, Basic authentication, TLS, gzip,
and the answers to everything that is not a scrape."""

from __future__ import annotations

import asyncio
import base64
import gzip
import ssl
import textwrap
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from proxy import config
from proxy.config import ProxyConfig
from proxy.dul.framer import Frame
from proxy.dul.machine import Side
from proxy.errors import ProxyError
from proxy.metrics import MetricsExporter, ProxyMetrics
from tests.conftest import Pki

BASE = """\
listeners: [{name: modalities, address: "127.0.0.1:0"}]
upstreams: {pacs: {address: "127.0.0.1:2762"}}
default_upstream: pacs
"""


def load(extra: str, folder: Path) -> ProxyConfig:
    return config.load_text(BASE + textwrap.dedent(extra), str(folder / "proxy.yaml"), base_dir=folder)


async def http_get(
    port: int,
    path: str = "/metrics",
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_context,
                                                   server_hostname="localhost" if ssl_context else None)
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _sep, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {k.lower(): v.strip() for k, _s, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split(" ")[1]), parsed, body


@pytest.fixture
async def plain(tmp_path: Path) -> AsyncIterator[tuple[MetricsExporter, ProxyMetrics]]:
    cfg = load('metrics: {address: "127.0.0.1:0"}\n', tmp_path)
    assert cfg.metrics is not None
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, cfg)
    exporter = MetricsExporter(cfg.metrics, registry, before_scrape=metrics.flush)
    await exporter.start()
    yield exporter, metrics
    await exporter.close()


def port_of(exporter: MetricsExporter) -> int:
    assert exporter.bound is not None
    return exporter.bound[1]


async def test_scrape_flushes_live_associations_first(plain: tuple[MetricsExporter, ProxyMetrics]) -> None:
    exporter, metrics = plain
    rec = metrics.association("modalities")
    rec.received(Side.REQUESTOR, 1234, [Frame(1, memoryview(b"\x01"))])
    status, headers, body = await http_get(port_of(exporter))
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert 'dicomproxy_build_info{version="' in text
    assert 'dicomproxy_associations_active{listener="modalities"} 1.0' in text
    assert 'dicomproxy_bytes_total{direction="to_upstream",listener="modalities",upstream="none"} 1234.0' in text
    assert 'dicomproxy_pdus_total{direction="to_upstream",type="associate_rq"} 1.0' in text


async def test_openmetrics_gzip_head_and_errors(plain: tuple[MetricsExporter, ProxyMetrics]) -> None:
    exporter, _metrics = plain
    port = port_of(exporter)
    status, headers, body = await http_get(port, headers={
        "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        "Accept-Encoding": "gzip",
    })
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert headers["content-encoding"] == "gzip"
    assert gzip.decompress(body).rstrip().endswith(b"# EOF")
    status, headers, body = await http_get(port, method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 1000
    assert (await http_get(port, "/-/healthy"))[0] == 200
    assert (await http_get(port, "/"))[0] == 404
    assert (await http_get(port, method="POST"))[0] == 405
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"nonsense\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 400")
    writer.close()


async def test_basic_auth(tmp_path: Path) -> None:
    password = tmp_path / "metrics.pass"
    password.write_text("s3cret:with colon\n")
    password.chmod(0o600)
    cfg = load("""\
        metrics:
          address: "127.0.0.1:0"
          basic_auth: {username: prometheus, password_file: metrics.pass}
        """, tmp_path)
    assert cfg.metrics is not None
    assert any("clear text" in w for w in cfg.warnings)  # basic auth without TLS
    exporter = MetricsExporter(cfg.metrics, CollectorRegistry())
    await exporter.start()
    try:
        port = port_of(exporter)

        def auth(user: str, secret: str) -> dict[str, str]:
            return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}

        status, headers, _body = await http_get(port)
        assert status == 401
        assert headers["www-authenticate"].startswith("Basic realm=")
        assert (await http_get(port, headers=auth("prometheus", "wrong")))[0] == 401
        assert (await http_get(port, headers=auth("root", "s3cret:with colon")))[0] == 401
        assert (await http_get(port, headers={"Authorization": "Basic !!!"}))[0] == 401
        assert (await http_get(port, headers={"Authorization": "Bearer x"}))[0] == 401
        assert (await http_get(port, headers=auth("prometheus", "s3cret:with colon")))[0] == 200
        # a changed password takes effect on reload
        password.write_text("new\n")
        assert exporter.reload(cfg.metrics)
        assert (await http_get(port, headers=auth("prometheus", "new")))[0] == 200
        assert (await http_get(port, headers=auth("prometheus", "s3cret:with colon")))[0] == 401
    finally:
        await exporter.close()


async def test_tls_and_basic_auth(tmp_path: Path, dev_certs: Pki) -> None:
    password = tmp_path / "pw"
    password.write_text("pw")
    password.chmod(0o600)
    cfg = load(f"""\
        metrics:
          address: "127.0.0.1:0"
          tls: {{cert: {dev_certs.archive_cert}, key: {dev_certs.archive_key}}}
          basic_auth: {{username: scraper, password_file: pw}}
        """, tmp_path)
    assert cfg.metrics is not None and not cfg.warnings
    exporter = MetricsExporter(cfg.metrics, CollectorRegistry())
    await exporter.start()
    try:
        port = port_of(exporter)
        client = ssl.create_default_context(cafile=str(dev_certs.ca))
        token = base64.b64encode(b"scraper:pw").decode()
        status, _headers, _body = await http_get(port, "/-/healthy", ssl_context=client,
                                                 headers={"Authorization": f"Basic {token}"})
        assert status == 200
        status, _headers, _body = await http_get(port, ssl_context=client)
        assert status == 401
        # plaintext HTTP on the TLS port gets nothing
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert not (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        await exporter.close()


async def test_unusable_password_file_at_start(tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text("pw")
    cfg = load("""\
        metrics:
          address: "127.0.0.1:0"
          basic_auth: {username: scraper, password_file: pw}
        """, tmp_path)
    assert cfg.metrics is not None
    password.write_text("")
    exporter = MetricsExporter(cfg.metrics, CollectorRegistry())
    with pytest.raises(ProxyError, match="password file"):
        await exporter.start()
    assert not exporter.reload(cfg.metrics)


async def test_address_in_use(plain: tuple[MetricsExporter, ProxyMetrics], tmp_path: Path) -> None:
    exporter, _metrics = plain
    cfg = load(f'metrics: {{address: "127.0.0.1:{port_of(exporter)}"}}\n', tmp_path)
    assert cfg.metrics is not None
    with pytest.raises(OSError):
        await MetricsExporter(cfg.metrics, CollectorRegistry()).start()
