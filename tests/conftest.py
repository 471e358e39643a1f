"""Shared fixtures for end-to-end tests: PKIs, the proxy as a real subprocess, and real archives
(dcmtk ``storescp +tls`` and a pynetdicom TLS archive). Everything binds to 127.0.0.1 only."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.peers import (
    LOOPBACK,
    Peer,
    PynetdicomArchive,
    PynetdicomStorageSCP,
    dcmtk_env,
    free_port,
    require_dcmtk,
    require_module,
    tls_server_context,
    wait_for_line,
    wait_for_listen,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    """The files written by ``proxy.certs.init``."""

    directory: Path
    ca: Path
    ca_key: Path
    archive_cert: Path
    archive_key: Path
    proxy_cert: Path
    proxy_key: Path
    modality_cert: Path
    modality_key: Path

    @classmethod
    def create(cls, directory: Path) -> Pki:
        from proxy import certs

        files = certs.init(directory)
        pki = cls(
            directory=directory,
            ca=files["ca"],
            ca_key=files["ca_key"],
            archive_cert=files["archive"],
            archive_key=files["archive_key"],
            proxy_cert=files["proxy"],
            proxy_key=files["proxy_key"],
            modality_cert=files["modality"],
            modality_key=files["modality_key"],
        )
        for path in files.values():
            assert path.is_file(), f"certs.init() did not write {path}"
        return pki


@pytest.fixture(scope="session")
def dev_certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The development PKI everybody trusts: archive, proxy and modality certificates."""
    return Pki.create(tmp_path_factory.mktemp("pki-dev"))


@pytest.fixture(scope="session")
def other_ca_certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second, unrelated PKI: its certificates must not be trusted by anyone using dev_certs."""
    return Pki.create(tmp_path_factory.mktemp("pki-other"))


# --------------------------------------------------------------------------- the proxy


@dataclass(frozen=True)
class UpstreamSpec:
    """One upstream for the generated config: TLS with ``pki``'s CA and proxy client certificate,
    or plaintext when ``pki`` is None."""

    port: int
    pki: Pki | None
    server_name: str = "localhost"


@dataclass
class RunningProxy:
    peer: Peer
    port: int
    config_path: Path

    @property
    def pid(self) -> int:
        return self.peer.pid

    def log_text(self, since: int = 0) -> str:
        return self.peer.log_text(since)

    def log_size(self) -> int:
        return self.peer.log_size()

    def wait_for_log(self, regex: str, timeout: float = 10.0, *, since: int = 0) -> re.Match[str]:
        return wait_for_line(self.peer, regex, timeout, since=since)

    def stop(self, timeout: float = 15.0) -> int:
        return self.peer.stop(timeout)


@dataclass
class ProxyFactory:
    tmp_path: Path
    default_pki: Pki
    started: list[RunningProxy] = field(default_factory=list)

    def __call__(
        self,
        upstream: int | UpstreamSpec | Mapping[str, UpstreamSpec],
        *,
        default_upstream: str | None = "pacs",
        routes: Mapping[str, str] | None = None,
        timeouts: Mapping[str, float] | None = None,
        extra: Mapping[str, Any] | None = None,
        listener_tls: Mapping[str, Any] | None = None,
        listener: Mapping[str, Any] | None = None,
        startup_timeout: float = 15.0,
    ) -> RunningProxy:
        """Write a config and start ``python -m proxy run -c`` on a free listener port.

        ``upstream`` is a port (a TLS upstream named ``pacs`` using dev_certs), one spec, or a
        mapping name -> spec; ``routes`` maps called AE titles to upstream names; ``listener`` adds
        keys to the listener (``client_identity``, ``proxy_protocol`` ...)."""
        if isinstance(upstream, int):
            upstreams: Mapping[str, UpstreamSpec] = {"pacs": UpstreamSpec(upstream, self.default_pki)}
        elif isinstance(upstream, UpstreamSpec):
            upstreams = {"pacs": upstream}
        else:
            upstreams = upstream
        index = len(self.started)
        port = free_port()
        config: dict[str, Any] = {
            "listeners": [
                {"name": "modalities", "address": f"{LOOPBACK}:{port}"}
                | ({"tls": dict(listener_tls)} if listener_tls is not None else {})
                | dict(listener or {})
            ],
            "upstreams": {name: _upstream_yaml(spec) for name, spec in upstreams.items()},
            "timeouts": {"artim": 30, "connect": 10, "idle": 300, **(timeouts or {})},
        }
        if default_upstream is not None:
            config["default_upstream"] = default_upstream
        if routes:
            config["routes"] = dict(routes)
        config.update(extra or {})
        config_path = self.tmp_path / f"proxy{index}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))

        peer = Peer(
            f"proxy{index}",
            [sys.executable, "-m", "proxy", "run", "-c", str(config_path)],
            self.tmp_path / f"proxy{index}.log",
            cwd=REPO_ROOT,
        )
        running = RunningProxy(peer, port, config_path)
        self.started.append(running)
        peer.start()
        match = wait_for_line(peer, LISTENING, startup_timeout)
        assert int(match.group(1)) == port, f"proxy listens on {match.group(0)}, expected port {port}"
        return running

    def stop_all(self) -> None:
        for running in self.started:
            running.peer.stop()


def _upstream_yaml(spec: UpstreamSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"address": f"{LOOPBACK}:{spec.port}"}
    if spec.pki is not None:
        out["tls"] = {
            "ca": str(spec.pki.ca),
            "cert": str(spec.pki.proxy_cert),
            "key": str(spec.pki.proxy_key),
            "server_name": spec.server_name,
        }
    return out


@pytest.fixture
def proxy_factory(tmp_path: Path, dev_certs: Pki) -> Iterator[ProxyFactory]:
    factory = ProxyFactory(tmp_path, dev_certs)
    yield factory
    factory.stop_all()


# --------------------------------------------------------------------------- dcmtk storescp +tls


@dataclass
class Storescp:
    peer: Peer
    port: int
    out_dir: Path
    ae_title: str

    def log_text(self) -> str:
        return self.peer.log_text()

    def received_files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())


StorescpFactory = Callable[..., Storescp]


@pytest.fixture
def storescp_tls_factory(tmp_path: Path, dev_certs: Pki) -> Iterator[StorescpFactory]:
    """Start dcmtk ``storescp`` with TLS on a free port.

    Flags: ``+tls KEY CERT`` ``+cf CA`` (client certificates are required by default, ``-rc``),
    ``+xa`` accept every supported transfer syntax, ``+B`` write what arrived bit for bit,
    ``-od DIR``, ``-v`` so every association and request is logged.
    """
    storescp = require_dcmtk("storescp")
    started: list[Storescp] = []

    def start(
        pki: Pki | None = None, *, ae_title: str = "ARCHIVE", extra_args: tuple[str, ...] = ()
    ) -> Storescp:
        pki = pki or dev_certs
        index = len(started)
        out_dir = tmp_path / f"storescp{index}-out"
        out_dir.mkdir()
        port = free_port()
        argv = [
            storescp, "-v",
            "+tls", str(pki.archive_key), str(pki.archive_cert), "+cf", str(pki.ca),
            "+xa", "+B", "-od", str(out_dir), "-aet", ae_title,
            *extra_args, str(port),
        ]  # fmt: skip
        peer = Peer(f"storescp{index}", argv, tmp_path / f"storescp{index}.log", env=dcmtk_env())
        scp = Storescp(peer, port, out_dir, ae_title)
        started.append(scp)
        peer.start()
        # a probe connection would make storescp log a failed TLS handshake: watch the socket
        wait_for_listen(peer, port)
        return scp

    yield start
    for scp in started:
        scp.peer.stop()


@pytest.fixture
def storescp_tls(storescp_tls_factory: StorescpFactory) -> Storescp:
    return storescp_tls_factory()


# --------------------------------------------------------------------------- pynetdicom archive


@pytest.fixture
def pynetdicom_tls_scp(tmp_path: Path, dev_certs: Pki) -> Iterator[PynetdicomArchive]:
    """A pynetdicom TLS archive requiring client certificates from dev_certs' CA: Verification,
    Storage (into tmp_path/archive-store), Study/Patient Root C-FIND, C-GET and C-MOVE."""
    require_module("pynetdicom")
    store = tmp_path / "archive-store"
    store.mkdir()
    ctx = tls_server_context(dev_certs.archive_cert, dev_certs.archive_key, dev_certs.ca)
    archive = PynetdicomArchive(ssl_context=ctx, store_dir=store).start()
    yield archive
    archive.stop()


@pytest.fixture
def move_destination(tmp_path: Path) -> Iterator[PynetdicomStorageSCP]:
    """A plaintext pynetdicom Storage SCP, the target of C-MOVE sub-associations."""
    require_module("pynetdicom")
    store = tmp_path / "movedest-store"
    store.mkdir()
    scp = PynetdicomStorageSCP(store_dir=store).start()
    yield scp
    scp.stop()
