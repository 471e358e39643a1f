"""Real peer processes for end-to-end tests: ports, log files, start and stop by PID.

Every child writes its combined stdout/stderr to a file under the test's tmp_path, never to a pipe,
so a chatty peer can not block on a full pipe buffer and a test can search its log at any time.
Waiting is always on a condition (a port that listens, a line in a log, an event), with a deadline.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import psutil
import pytest

LOOPBACK = "127.0.0.1"
POLL_INTERVAL = 0.02  # seconds between two looks at a condition


def _in_ci() -> bool:
    return os.environ.get("CI") == "true"


def missing(what: str) -> None:
    """Skip the test on a developer machine, fail it in CI (where every peer must be installed)."""
    if _in_ci():
        pytest.fail(f"{what} is required in CI", pytrace=False)
    pytest.skip(f"{what} is not available", allow_module_level=True)


def _venv_bin_dirs() -> set[Path]:
    dirs = {Path(sys.prefix) / "bin", Path(sys.executable).parent}
    return {d.resolve() for d in dirs}


@cache
def _which_outside_venv(name: str) -> str | None:
    """Find a binary on PATH, skipping the virtualenv: pynetdicom installs Python scripts named
    ``storescu``, ``storescp``, ``echoscu``, ``findscu`` ... there, which shadow dcmtk's binaries."""
    venv_dirs = _venv_bin_dirs()
    search = [*os.environ.get("PATH", os.defpath).split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    for entry in search:
        if not entry:
            continue
        directory = Path(entry)
        with contextlib.suppress(OSError):
            if directory.resolve() in venv_dirs:
                continue
        found = shutil.which(name, path=str(directory))
        if found:
            return found
    return None


def require_tool(name: str) -> str:
    """Absolute path of an external program; skip locally / fail in CI when it is missing."""
    path = _which_outside_venv(name)
    if path is None:
        missing(f"program {name!r}")
        raise AssertionError("unreachable")  # pragma: no cover - missing() never returns
    return path


@cache
def _dcmtk_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout + out.stderr


def require_dcmtk(name: str) -> str:
    """Path of a dcmtk tool (checked by its ``--version`` banner, not only by its name)."""
    path = require_tool(name)
    if "$dcmtk:" not in _dcmtk_version(path):
        missing(f"dcmtk's {name!r} (found {path}, which is not dcmtk)")
    return path


def require_module(name: str) -> ModuleType:
    """Import a module; skip locally / fail in CI when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"python module {name!r} ({exc})")
        raise AssertionError("unreachable") from exc  # pragma: no cover


def dcmtk_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for dcmtk tools. Debian's dcmtk leaves Nagle on unless TCP_NODELAY is set,
    which costs ~40 ms per small DIMSE message on loopback."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.pop("DCMDICTPATH", None)  # use the built-in dictionary
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------- ports


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the kernel picks it; the socket is closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def closed_port(host: str = LOOPBACK) -> int:
    """A port on which nothing listens: connecting to it is refused (checked)."""
    for _ in range(20):
        port = free_port(host)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            if probe.connect_ex((host, port)) != 0:
                return port
    raise RuntimeError("could not find a closed port")


def wait_for_port(host: str, port: int, timeout: float = 10.0, *, peer: Peer | None = None) -> None:
    """Wait until a TCP connect to host:port succeeds. The probe connection is closed at once, so
    only use this on servers that shrug off an empty connection; for TLS servers that would log a
    failed handshake, prefer :func:`wait_for_listen`."""

    def ready() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((host, port)) == 0

    wait_until(ready, timeout, f"{host}:{port} to accept connections", peer=peer)


def _listens(pid: int, port: int) -> bool:
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def wait_for_listen(peer: Peer, port: int, timeout: float = 10.0) -> None:
    """Wait until the peer's process has a listening socket on ``port`` (no probe connection)."""
    wait_until(lambda: _listens(peer.pid, port), timeout, f"{peer.name} to listen on port {port}", peer=peer)


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, *, peer: Peer | None = None
) -> None:
    """Poll ``condition`` until it is true; fail with ``what`` (and the peer's log) at the deadline,
    or at once if the peer process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if peer is not None and peer.returncode() is not None:
            raise AssertionError(
                f"{peer.name} exited with {peer.returncode()} while waiting for {what}\n"
                f"--- {peer.log_path} ---\n{peer.log_text()[-4000:]}"
            )
        if time.monotonic() >= deadline:
            detail = f"\n--- {peer.log_path} ---\n{peer.log_text()[-4000:]}" if peer is not None else ""
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(POLL_INTERVAL)


# --------------------------------------------------------------------------- logs


def wait_for_line(
    source: Peer | Path,
    regex: str | re.Pattern[str],
    timeout: float = 10.0,
    *,
    since: int = 0,
) -> re.Match[str]:
    """Read a log file incrementally until a line matches ``regex``; return the match.

    ``source`` is a :class:`Peer` (its combined output file) or a path. ``since`` is a byte offset
    (for example ``peer.log_size()`` taken before an action) so that only newer lines count.
    Only complete lines are matched, so a half-written line never gives a partial match.
    """
    peer = source if isinstance(source, Peer) else None
    path = source.log_path if isinstance(source, Peer) else source
    pattern = re.compile(regex) if isinstance(regex, str) else regex
    offset = since
    pending = b""
    found: list[re.Match[str]] = []

    def scan() -> bool:
        nonlocal offset, pending
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
        except FileNotFoundError:
            return False
        offset += len(chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            match = pattern.search(raw.decode("utf-8", "replace"))
            if match:
                found.append(match)
                return True
        return False

    try:
        wait_until(scan, timeout, f"a line matching {pattern.pattern!r} in {path}", peer=peer)
    except AssertionError:
        if peer is None:
            raise
        # the process may have written the line and exited: one last look
        if scan():
            return found[0]
        raise
    return found[0]


# --------------------------------------------------------------------------- processes


@dataclass
class Peer:
    """One external process with its output in ``log_path``; stopped by PID (SIGTERM, then SIGKILL)."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def start(self) -> Peer:
        if self.proc is not None:
            raise RuntimeError(f"{self.name} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        return self.proc.pid

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self, since: int = 0) -> str:
        """The output so far, from byte offset ``since`` (see :meth:`log_size`)."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(since)
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        """Current size of the log, to pass as ``since`` to :func:`wait_for_line`."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit on its own; fail (and kill it) after ``timeout``."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not finish within {timeout}s\n--- {self.log_path} ---\n"
                f"{self.log_text()[-4000:]}"
            ) from None

    def signal(self, signum: int) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit status
        (negative signal number if killed by a signal)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> Peer:
        return self.start() if self.proc is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_tool(
    argv: Sequence[str], log_path: Path, *, timeout: float, env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """Run a short-lived tool to completion with its output in ``log_path``; (exit code, output)."""
    peer = Peer(Path(argv[0]).name, argv, log_path, env=env).start()
    code = peer.wait(timeout)
    return code, peer.log_text()


# --------------------------------------------------------------------------- raw DICOM UL bytes

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION_SOP_CLASS = b"1.2.840.10008.1.1"
IMPLICIT_VR_LE = b"1.2.840.10008.1.2"


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq_bytes(called: str = "ARCHIVE", calling: str = "RAWSCU", max_pdu: int = 16384) -> bytes:
    """A minimal, valid A-ASSOCIATE-RQ proposing Verification with Implicit VR LE (PS3.8 9.3.2)."""
    context = _item(
        0x20,
        bytes([1, 0, 0, 0]) + _item(0x30, VERIFICATION_SOP_CLASS) + _item(0x40, IMPLICIT_VR_LE),
    )
    user_info = _item(
        0x50,
        _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.10.1499.1"),
    )
    body = (
        struct.pack(">HH", 1, 0)
        + called.encode("ascii").ljust(16)
        + calling.encode("ascii").ljust(16)
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT)
        + context
        + user_info
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    """Read exactly ``count`` bytes or raise EOFError with what arrived."""
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {count} bytes: {bytes(data)!r}")
        data += chunk
    return bytes(data)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """(PDU type, body) of the next PDU on ``sock``."""
    header = recv_exactly(sock, 6)
    pdu_type, _, length = struct.unpack(">BBI", header)
    if length > 1 << 20:
        raise AssertionError(f"unexpectedly large PDU: type {pdu_type:#x} length {length}")
    return pdu_type, recv_exactly(sock, length)


def read_until_closed(sock: socket.socket, limit: int = 1 << 16) -> bytes:
    """Everything the peer sends until it closes (a reset counts as a close)."""
    data = bytearray()
    while len(data) < limit:
        try:
            chunk = sock.recv(limit - len(data))
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


# --------------------------------------------------------------------------- pynetdicom peers
# pynetdicom is imported lazily so that this module stays importable when it is missing.


@dataclass(frozen=True)
class Received:
    """One C-STORE as it arrived: the data set bytes exactly as sent on the wire."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    dataset: bytes
    calling_ae: str


class _StoreSink:
    """Thread-safe collection of received C-STOREs with a wait on the count."""

    def __init__(self, directory: Path | None) -> None:
        import threading

        self.directory = directory
        self.objects: dict[str, Received] = {}
        self._cond = threading.Condition()

    def handle_store(self, event: Any) -> int:
        request = event.request
        item = Received(
            sop_class=str(request.AffectedSOPClassUID),
            sop_instance=str(request.AffectedSOPInstanceUID),
            transfer_syntax=str(event.context.transfer_syntax),
            dataset=event.encoded_dataset(include_meta=False),
            calling_ae=event.assoc.requestor.ae_title.strip(),
        )
        if self.directory is not None:
            (self.directory / f"{item.sop_instance}.dcm").write_bytes(event.encoded_dataset(include_meta=True))
        with self._cond:
            self.objects[item.sop_instance] = item
            self._cond.notify_all()
        return 0x0000

    def snapshot(self) -> dict[str, Received]:
        with self._cond:
            return dict(self.objects)

    def wait_for_count(self, count: int, timeout: float = 30.0) -> dict[str, Received]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.objects) >= count, timeout):
                raise AssertionError(f"expected {count} objects, got {len(self.objects)} within {timeout}s")
            return dict(self.objects)


def tls_server_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """A TLS server context for test archives, built with the standard library only, so that the
    archive does not share code with the proxy under test. Requires a client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def tls_client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    return ctx


QUERY_RETRIEVE_MODELS = (
    "1.2.840.10008.5.1.4.1.2.1.1",  # Patient Root Query/Retrieve Information Model - FIND
    "1.2.840.10008.5.1.4.1.2.1.2",  # - MOVE
    "1.2.840.10008.5.1.4.1.2.1.3",  # - GET
    "1.2.840.10008.5.1.4.1.2.2.1",  # Study Root Query/Retrieve Information Model - FIND
    "1.2.840.10008.5.1.4.1.2.2.2",  # - MOVE
    "1.2.840.10008.5.1.4.1.2.2.3",  # - GET
)


def _storage_classes(contexts: Sequence[Any]) -> list[str]:
    return [str(cx.abstract_syntax) for cx in contexts if cx.abstract_syntax is not None]


def _explicit_first(syntaxes: Sequence[str]) -> list[str]:
    """pynetdicom as acceptor picks the first transfer syntax of *its own* list that the requestor
    proposed; putting Explicit VR LE first keeps objects stored in it unconverted."""
    explicit = "1.2.840.10008.1.2.1"
    return [explicit, *(ts for ts in syntaxes if ts != explicit)]


class PynetdicomArchive:
    """A pynetdicom archive in this process (its own threads): Verification, Storage, Study and
    Patient Root C-FIND / C-GET / C-MOVE. TLS when ``ssl_context`` is given.

    * ``find_identifiers``: what C-FIND searches (matching on the keys with a value; ``*``/``?``
      wildcards); responses carry only the requested keys, like a real archive.
    * ``retrievable``: Part 10 files that C-GET / C-MOVE send (all of them, or those whose
      SOPInstanceUID / StudyInstanceUID matches the request identifier).
    * ``move_destinations``: AE title -> (host, port) for C-MOVE sub-associations (plaintext).
    * ``stored``: everything received by C-STORE.
    """

    def __init__(
        self,
        *,
        ae_title: str = "ARCHIVE",
        ssl_context: ssl.SSLContext | None = None,
        store_dir: Path | None = None,
        port: int | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.ssl_context = ssl_context
        self.port = port if port is not None else free_port()
        self.sink = _StoreSink(store_dir)
        self.find_identifiers: list[object] = []
        self.retrievable: list[Path] = []
        self.move_destinations: dict[str, tuple[str, int]] = {}
        self.echo_count = 0
        self.associations: list[str] = []  # calling AE title of every accepted association
        self.aborts = 0  # associations that ended with an A-ABORT (either side)
        self._server: Any = None

    @property
    def stored(self) -> dict[str, Received]:
        return self.sink.snapshot()

    def start(self) -> PynetdicomArchive:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = 40
        ae.add_supported_context(VERIFICATION_SOP_CLASS.decode())
        for cx in _storage_classes(AllStoragePresentationContexts):
            # scu_role/scp_role: accept the C-GET requestor's role selection proposals
            ae.add_supported_context(cx, _explicit_first(ALL_TRANSFER_SYNTAXES), scu_role=True, scp_role=True)
        for model in QUERY_RETRIEVE_MODELS:
            ae.add_supported_context(model)
        # outgoing C-MOVE sub-associations
        for cx in _storage_classes(AllStoragePresentationContexts)[:120]:
            ae.add_requested_context(cx, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self.sink.handle_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        self._server = ae.start_server(
            (LOOPBACK, self.port), block=False, evt_handlers=handlers, ssl_context=self.ssl_context
        )
        return self

    def stop(self) -> None:
        server = self._server
        if server is not None:
            self._server = None
            server.shutdown()

    def __enter__(self) -> PynetdicomArchive:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # handlers -----------------------------------------------------------------------

    def _on_accepted(self, event: Any) -> None:
        self.associations.append(event.assoc.requestor.ae_title.strip())

    def _on_aborted(self, event: Any) -> None:
        self.aborts += 1

    def _on_echo(self, event: Any) -> int:
        self.echo_count += 1
        return 0x0000

    def _on_find(self, event: Any) -> Iterator[tuple[int, object | None]]:
        from fnmatch import fnmatchcase

        from pydicom.dataset import Dataset

        query = event.identifier
        keys = [elem.keyword for elem in query if elem.keyword and elem.keyword != "SpecificCharacterSet"]
        for candidate in self.find_identifiers:
            assert isinstance(candidate, Dataset)
            if candidate.get("QueryRetrieveLevel") != query.get("QueryRetrieveLevel"):
                continue
            ok = True
            for keyword in keys:
                wanted = query.get(keyword)
                if keyword == "QueryRetrieveLevel" or wanted in (None, "", []):
                    continue
                have = candidate.get(keyword)
                if not fnmatchcase(str(have), str(wanted)):
                    ok = False
                    break
            if not ok:
                continue
            answer = Dataset()
            if "SpecificCharacterSet" in candidate:
                answer.SpecificCharacterSet = candidate.SpecificCharacterSet
            for keyword in keys:
                value = candidate.get(keyword)
                setattr(answer, keyword, value if value is not None else "")
            yield 0xFF00, answer
        yield 0x0000, None

    def _select(self, identifier: object) -> list[Path]:
        from pydicom import dcmread

        wanted: dict[str, str] = {}
        for keyword in ("SOPInstanceUID", "StudyInstanceUID"):
            value = getattr(identifier, keyword, None)
            if value not in (None, "", "*"):
                wanted[keyword] = str(value)
        out = []
        for path in self.retrievable:
            ds = dcmread(path, stop_before_pixels=True)
            if all(str(ds.get(k)) == v for k, v in wanted.items()):
                out.append(path)
        return out

    def _on_get(self, event: Any) -> Iterator[object]:
        from pydicom import dcmread

        paths = self._select(event.identifier)
        yield len(paths)
        for path in paths:
            yield 0xFF00, dcmread(path)

    def _on_move(self, event: Any) -> Iterator[object]:
        from pydicom import dcmread

        raw = event.move_destination
        destination = (raw.decode("ascii") if isinstance(raw, bytes) else str(raw)).strip()
        if destination not in self.move_destinations:
            yield None, None
            return
        yield self.move_destinations[destination]
        paths = self._select(event.identifier)
        yield len(paths)
        for path in paths:
            yield 0xFF00, dcmread(path)


class PynetdicomStorageSCP:
    """A plaintext pynetdicom Storage SCP (a C-MOVE destination) in this process."""

    def __init__(self, *, ae_title: str = "MOVEDEST", store_dir: Path | None = None) -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.sink = _StoreSink(store_dir)
        self._server: Any = None

    def start(self) -> PynetdicomStorageSCP:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.ae_title)
        for cx in _storage_classes(AllStoragePresentationContexts):
            ae.add_supported_context(cx, _explicit_first(ALL_TRANSFER_SYNTAXES))
        self._server = ae.start_server(
            (LOOPBACK, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.sink.handle_store)]
        )
        return self

    def stop(self) -> None:
        server = self._server
        if server is not None:
            self._server = None
            server.shutdown()
