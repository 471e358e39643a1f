"""A throwaway MIT Kerberos realm for tests: its own KDC process on a free loopback port.

Everything lives in one temp folder: krb5.conf (KRB5_CONFIG), kdc.conf (KRB5_KDC_PROFILE), the
database, the stash, keytabs, the replay cache and the KDC log. The machine's /etc/krb5.conf names a
remote realm, so every tool and the in-process gssapi library must be pointed at ours: the test that
uses the realm applies `Realm.env` with monkeypatch. Setup takes a fraction of a second.

Debian packages: krb5-kdc krb5-admin-server (krb5kdc, kdb5_util, kadmin.local) and libkrb5-dev
(to build python-gssapi). Missing tools skip the test locally and fail it in CI (tests.peers.missing).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.peers import LOOPBACK, Peer, free_port, missing, wait_until

REALM = "DICOM.TEST"
SERVICE = f"dicom/localhost@{REALM}"
CLIENT = f"dicomproxy@{REALM}"
MODALITY = f"ct01@{REALM}"
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_tool(name: str) -> str:
    """A KDC tool on PATH or in the sbin folders (a non-root PATH often lacks /usr/sbin)."""
    found = shutil.which(name) or next(
        (p for p in (shutil.which(name, path=d) for d in SBIN) if p is not None), None
    )
    if found is None:
        missing(f"MIT Kerberos tool {name!r} (Debian: krb5-kdc krb5-admin-server)")
        raise AssertionError("unreachable")  # pragma: no cover - missing() never returns
    return found


@dataclass(frozen=True)
class Realm:
    name: str
    directory: Path
    port: int
    env: Mapping[str, str]  # KRB5_CONFIG, KRB5_KDC_PROFILE, KRB5RCACHEDIR, KRB5CCNAME
    client_keytab: Path  # keys of CLIENT (the proxy as initiator)
    modality_keytab: Path  # keys of MODALITY (a client of the proxy's acceptor)
    service_keytab: Path  # keys of SERVICE (the acceptor)
    kdc: Peer

    def kadmin(self, query: str) -> str:
        return _run([find_tool("kadmin.local"), "-r", self.name, "-q", query], self.env)


def _run(argv: list[str], env: Mapping[str, str]) -> str:
    out = subprocess.run(argv, env=dict(env), capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out.stdout


def _udp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _port() -> int:
    """A port free for both TCP and UDP (the KDC listens on both)."""
    for _ in range(20):
        port = free_port()
        if _udp_free(port):
            return port
    raise RuntimeError("no port free for both TCP and UDP")


@contextmanager
def realm(directory: Path, base_env: Mapping[str, str]) -> Iterator[Realm]:
    """Create the realm in `directory`, start krb5kdc in the foreground, stop it by PID at exit."""
    krb5kdc, kdb5_util = find_tool("krb5kdc"), find_tool("kdb5_util")
    find_tool("kadmin.local")
    directory.mkdir(parents=True, exist_ok=True)
    port = _port()
    conf, kdc_conf = directory / "krb5.conf", directory / "kdc.conf"
    rcache = directory / "rcache"
    rcache.mkdir(exist_ok=True)
    conf.write_text(
        f"[libdefaults]\n"
        f"  default_realm = {REALM}\n"
        f"  dns_lookup_kdc = false\n  dns_lookup_realm = false\n  rdns = false\n"
        f"  dns_canonicalize_hostname = false\n"
        f"  udp_preference_limit = 1\n"  # TCP: no UDP retries to wait for in a test
        f"[realms]\n  {REALM} = {{\n    kdc = {LOOPBACK}:{port}\n  }}\n"
        f"[domain_realm]\n  localhost = {REALM}\n",
        encoding="utf-8",
    )
    kdc_conf.write_text(
        f"[kdcdefaults]\n  kdc_listen = {LOOPBACK}:{port}\n  kdc_tcp_listen = {LOOPBACK}:{port}\n"
        f"[realms]\n  {REALM} = {{\n"
        f"    database_name = {directory / 'principal'}\n"
        f"    key_stash_file = {directory / 'stash'}\n"
        f"    acl_file = {directory / 'kadm5.acl'}\n"
        f"    kdc_listen = {LOOPBACK}:{port}\n    kdc_tcp_listen = {LOOPBACK}:{port}\n"
        f"    max_life = 1h\n    max_renewable_life = 1d\n"
        f"  }}\n"
        f"[logging]\n  kdc = FILE:{directory / 'kdc.log'}\n",
        encoding="utf-8",
    )
    (directory / "kadm5.acl").write_text("", encoding="utf-8")
    env = {
        **base_env,
        "KRB5_CONFIG": str(conf),
        "KRB5_KDC_PROFILE": str(kdc_conf),
        "KRB5RCACHEDIR": str(rcache),
        "KRB5CCNAME": f"FILE:{directory / 'ccache'}",
    }
    env.pop("KRB5_CLIENT_KTNAME", None)
    env.pop("KRB5_KTNAME", None)
    _run([kdb5_util, "create", "-s", "-r", REALM, "-P", "throwaway-master-key"], env)
    kdc = Peer("krb5kdc", [krb5kdc, "-n", "-r", REALM], directory / "krb5kdc.out", env=env)
    made = Realm(
        name=REALM,
        directory=directory,
        port=port,
        env=env,
        client_keytab=directory / "client.keytab",
        modality_keytab=directory / "modality.keytab",
        service_keytab=directory / "service.keytab",
        kdc=kdc,
    )
    for principal in (CLIENT, MODALITY, SERVICE):
        made.kadmin(f"addprinc -randkey {principal}")
    made.kadmin(f"ktadd -k {made.client_keytab} {CLIENT}")
    made.kadmin(f"ktadd -k {made.modality_keytab} {MODALITY}")
    made.kadmin(f"ktadd -k {made.service_keytab} {SERVICE}")
    kdc.start()
    try:
        wait_until(lambda: _listens(port), 10.0, f"krb5kdc to listen on {LOOPBACK}:{port}", peer=kdc)
        yield made
    finally:
        kdc.stop()


def _listens(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0
