"""`dicom-proxy demo`: the whole story on one machine, no dcmtk needed.

A TLS-only archive that demands client certificates, the proxy in front of it, and a legacy
"modality" that only speaks plaintext DICOM. The modality sends pydicom's bundled sample
objects through the proxy; the demo prints what reached the archive and whether every data set
arrived byte for byte.

pynetdicom (a dev dependency) plays the archive and the modality; the proxy runs as a real
subprocess (`python -m proxy run -c proxy.yaml`), exactly as an administrator would start it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from proxy import certs, tls

LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
STARTUP_TIMEOUT = 20.0  # seconds for the proxy to log its listening line
STOP_TIMEOUT = 20.0  # seconds for the proxy to exit after SIGTERM
SAMPLES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "rtplan.dcm",
    "waveform_ecg.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle.dcm",
)
VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (PS3.4 A.4)
ARCHIVE_AE = "ARCHIVE"
MODALITY_AE = "MODALITY01"


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- the archive


@dataclass(frozen=True)
class Arrival:
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    sha256: str
    size: int
    calling_ae: str


class TlsArchive:
    """A pynetdicom Storage SCP reachable only over TLS with a client certificate."""

    def __init__(self, workdir: Path, pki: dict[str, Path]) -> None:
        self.port = _free_port()
        self.store = workdir / "archive"
        self.store.mkdir(parents=True, exist_ok=True)
        self.context = tls.server_context(
            pki["archive"], pki["archive_key"], client_ca=pki["ca"], require_client_cert=True
        )
        self.arrivals: dict[str, Arrival] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def start(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        ae = AE(ae_title=ARCHIVE_AE)
        ae.add_supported_context(VERIFICATION)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=self.context,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: Any) -> int:
        data: bytes = event.encoded_dataset(include_meta=False)
        arrival = Arrival(
            sop_class=str(event.request.AffectedSOPClassUID),
            sop_instance=str(event.request.AffectedSOPInstanceUID),
            transfer_syntax=str(event.context.transfer_syntax),
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            calling_ae=str(event.assoc.requestor.ae_title).strip(),
        )
        (self.store / f"{arrival.sop_instance}.dcm").write_bytes(event.encoded_dataset(include_meta=True))
        with self._lock:
            self.arrivals[arrival.sop_instance] = arrival
        return 0x0000

    def snapshot(self) -> dict[str, Arrival]:
        with self._lock:
            return dict(self.arrivals)


# --------------------------------------------------------------------------- the proxy


class ProxyProcess:
    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> int:
        """Start the proxy and return the port it listens on (from its log line)."""
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log_path.read_text("utf-8", "replace"))
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"the proxy exited with {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"the proxy did not start listening within {STARTUP_TIMEOUT:.0f}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def stop(self) -> int | None:
        """SIGTERM by PID; SIGKILL if it does not exit in time. Returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode


def write_config(path: Path, listen_port: int, archive_port: int, pki: dict[str, Path], metrics_port: int) -> None:
    config = {
        "metrics": {"address": f"127.0.0.1:{metrics_port}"},
        "listeners": [{"name": "modalities", "address": f"127.0.0.1:{listen_port}"}],
        "upstreams": {
            "pacs": {
                "address": f"127.0.0.1:{archive_port}",
                "tls": {
                    "ca": str(pki["ca"]),
                    "cert": str(pki["proxy"]),
                    "key": str(pki["proxy_key"]),
                    "server_name": "localhost",
                },
            }
        },
        "default_upstream": "pacs",
        "timeouts": {"artim": 30, "connect": 10, "idle": 300},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


# --------------------------------------------------------------------------- the modality


@dataclass(frozen=True)
class Sample:
    name: str
    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    sha256: str  # of the data set bytes (after the file meta), which is what goes on the wire
    size: int


def load_samples() -> list[Sample]:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pynetdicom.dsutils import split_dataset

    out = []
    for name in SAMPLES:
        found = get_testdata_file(name, download=False)
        if not isinstance(found, str):
            print(f"    (sample {name} is not available offline; skipped)")
            continue
        path = Path(found)
        meta, offset = split_dataset(path)
        data = path.read_bytes()[offset:]
        ds = dcmread(path, stop_before_pixels=True)
        # pynetdicom's C-STORE-RQ from a file names the instance of the file meta, which can
        # differ from the data set's (rtplan.dcm): key on what the archive will be told
        out.append(
            Sample(
                name=name,
                path=path,
                sop_class=str(meta.get("MediaStorageSOPClassUID", ds.SOPClassUID)),
                sop_instance=str(meta.get("MediaStorageSOPInstanceUID", ds.SOPInstanceUID)),
                transfer_syntax=str(meta.TransferSyntaxUID),
                sha256=hashlib.sha256(data).hexdigest(),
                size=len(data),
            )
        )
    return out


def send_plaintext(port: int, samples: list[Sample]) -> dict[str, int]:
    """One plaintext association through the proxy; C-STORE every sample. SOP instance -> status."""
    from pynetdicom import AE, _config

    # send each file's data set bytes as they are in the file, without decoding and re-encoding
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=MODALITY_AE)
    ae.acse_timeout = 30
    for sample in samples:
        ae.add_requested_context(sample.sop_class, [sample.transfer_syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=ARCHIVE_AE)
    if not assoc.is_established:
        raise RuntimeError("the proxy did not establish the association (see proxy.log)")
    statuses: dict[str, int] = {}
    try:
        for sample in samples:
            status = assoc.send_c_store(sample.path)
            statuses[sample.sop_instance] = int(status.Status) if status else -1
    finally:
        assoc.release()
    return statuses


def plaintext_refused_by_archive(archive_port: int) -> bool:
    """True if a plaintext association straight to the archive fails (it only speaks TLS)."""
    from pynetdicom import AE

    ae = AE(ae_title=MODALITY_AE)
    ae.acse_timeout = 5
    ae.network_timeout = 5
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", archive_port, ae_title=ARCHIVE_AE)
    if assoc.is_established:
        assoc.release()
        return False
    return True


# --------------------------------------------------------------------------- report


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name != uid else uid


def print_table(samples: list[Sample], arrivals: dict[str, Arrival], statuses: dict[str, int]) -> bool:
    headers = ("SOP class", "SOP instance UID", "transfer syntax", "bytes", "status", "sha256 match")
    rows = []
    all_ok = True
    for sample in samples:
        got = arrivals.get(sample.sop_instance)
        status = statuses.get(sample.sop_instance, -1)
        match = got is not None and got.sha256 == sample.sha256 and got.transfer_syntax == sample.transfer_syntax
        all_ok = all_ok and match and status == 0
        rows.append(
            (
                _uid_name(got.sop_class if got else sample.sop_class),
                sample.sop_instance,
                _uid_name(got.transfer_syntax) if got else "-",
                str(got.size) if got else "not received",
                f"0x{status:04X}" if status >= 0 else "none",
                "yes" if match else "NO",
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(("    " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))).rstrip())
    print("    " + line)
    for row in rows:
        cells = [c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print(("    " + "  ".join(cells)).rstrip())
    return all_ok


DEMO_METRICS = (
    "dicomproxy_associations_total",
    "dicomproxy_bytes_total",
    "dicomproxy_dimse_requests_total",
    "dicomproxy_dimse_responses_total",
    "dicomproxy_upstream_up",
)


def show_metrics(port: int) -> None:
    """A few non-zero series from /metrics: what an operator's Grafana would show."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    except OSError as exc:
        print(f"    (metrics not available: {exc})")
        return
    for line in text.splitlines():
        if line.startswith(DEMO_METRICS) and not line.endswith(" 0.0"):
            print(f"    {line}")


def run_demo(workdir: Path) -> int:
    """Run the demo in `workdir`; 0 if every object arrived at the archive byte for byte."""
    if importlib.util.find_spec("pynetdicom") is None:
        print("error: the demo needs pynetdicom: pip install -e '.[dev]' (or run `make demo`)", file=sys.stderr)
        return 1
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    step(f"creating a development PKI in {workdir / 'certs'} (CA, archive, proxy and modality certificates)")
    pki = certs.init(workdir / "certs", force=True)

    archive = TlsArchive(workdir, pki)
    step(f"starting TLS-only archive on 127.0.0.1:{archive.port} (requires client certificates)")
    archive.start()
    proxy: ProxyProcess | None = None
    try:
        refused = plaintext_refused_by_archive(archive.port)
        step(f"a plaintext association straight to the archive is refused: {'yes' if refused else 'NO'}")

        config_path = workdir / "proxy.yaml"
        listen_port = _free_port()
        metrics_port = _free_port()
        write_config(config_path, listen_port, archive.port, pki, metrics_port)
        step(f"wrote {config_path}: plaintext listener 127.0.0.1:{listen_port} -> TLS upstream 'pacs'")

        proxy = ProxyProcess(config_path, workdir / "proxy.log")
        step(f"starting the proxy: {Path(sys.executable).name} -m proxy run -c {config_path}")
        port = proxy.start()
        step(f"proxy is listening on 127.0.0.1:{port} (log: {proxy.log_path})")

        samples = load_samples()
        if not samples:
            print("error: none of pydicom's sample files are available", file=sys.stderr)
            return 1
        step(f"modality {MODALITY_AE} sends {len(samples)} objects in PLAINTEXT to the proxy")
        statuses = send_plaintext(port, samples)

        step("what arrived at the archive (over TLS, from the proxy's client certificate):")
        ok = print_table(samples, archive.snapshot(), statuses)

        step(f"the proxy's metrics for this run (http://127.0.0.1:{metrics_port}/metrics, for Prometheus):")
        show_metrics(metrics_port)

        step("stopping the proxy (SIGTERM)")
        code = proxy.stop()
        proxy = None
        step(f"proxy exited with status {code}")
        ok = ok and refused and code == 0
        step("demo succeeded: every object arrived byte for byte" if ok else "demo FAILED (see above)")
        return 0 if ok else 1
    finally:
        if proxy is not None:
            proxy.stop()
        step("stopping the archive")
        archive.stop()
