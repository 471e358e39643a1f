"""proxy.yaml -> frozen dataclasses. Relative paths resolve against the config file's folder.

CONTRACT (relay, cli and tests code against these names): extend, never rename.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proxy.dul.constants import DEFAULT_MAX_ASSOCIATE_LENGTH, DEFAULT_MAX_PDU_LENGTH


@dataclass(frozen=True)
class Address:
    host: str
    port: int  # 0 on a listener means "any free port" (tests); never 0 on an upstream

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UpstreamTLS:
    ca: Path | None = None  # trust anchors; None = the system store
    cert: Path | None = None  # optional client certificate ...
    key: Path | None = None  # ... and its key
    server_name: str | None = None  # SNI and hostname check; None = the host of the address


@dataclass(frozen=True)
class Upstream:
    name: str
    address: Address
    tls: UpstreamTLS | None  # None = plaintext upstream (warned about at start)


@dataclass(frozen=True)
class Listener:
    name: str
    address: Address


@dataclass(frozen=True)
class Timeouts:
    artim: float = 30.0  # TCP accept -> A-ASSOCIATE-RQ, and after RJ/RP/ABORT until close
    connect: float = 10.0  # TCP connect + TLS handshake to the upstream
    acse: float = 20.0  # RQ forwarded -> AC/RJ from upstream; below the 30 s clients wait
    idle: float = 300.0  # no PDU in either direction -> A-ABORT both sides
    shutdown: float = 30.0  # SIGTERM: how long live associations may finish


@dataclass(frozen=True)
class ProxyConfig:
    path: Path
    listeners: tuple[Listener, ...]
    upstreams: Mapping[str, Upstream]
    routes: Mapping[str, str] = field(default_factory=dict)  # called AE title (stripped) -> upstream name
    default_upstream: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_pdu_length: int = DEFAULT_MAX_PDU_LENGTH  # P in standards.md section 4
    max_associate_length: int = DEFAULT_MAX_ASSOCIATE_LENGTH
