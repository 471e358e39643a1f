"""systemd/: the unit passes `systemd-analyze verify`, keeps its hardening and a low exposure
score, the sysusers.d/tmpfiles.d files build the /etc/dicom-proxy layout, and the proxy really
runs under the unit's seccomp sandbox (SystemCallFilter=, MemoryDenyWriteExecute=,
RestrictAddressFamilies=), emulated with libseccomp because no systemd runs as PID 1 here."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.conftest import Pki
from tests.peers import LOOPBACK, Peer, PynetdicomArchive, free_port, require_tool, wait_for_line

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = REPO_ROOT / "systemd"
UNIT = SYSTEMD / "dicom-proxy.service"
SYSUSERS = SYSTEMD / "dicom-proxy.sysusers.conf"
TMPFILES = SYSTEMD / "dicom-proxy.tmpfiles.conf"
INSTALLED_BINARY = "/opt/dicom-proxy/bin/dicom-proxy"
MAX_EXPOSURE = 2.0
"""`systemd-analyze security` scores 0 (locked down) to 10 (exposed); 1.4 at the time of writing."""


def unit_entries(path: Path = UNIT) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; continuation lines are not used in our units."""
    entries = []
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit_entries() if s == section and k == key]


def analyze() -> str:
    return require_tool("systemd-analyze")


def unit_copy(tmp_path: Path) -> Path:
    """The unit with the installed binary path pointed at an executable in tmp_path:
    `systemd-analyze verify` checks that every Exec*= program exists."""
    stand_in = tmp_path / "dicom-proxy"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text(encoding="utf-8").replace(INSTALLED_BINARY, str(stand_in)))
    return copy


# --------------------------------------------------------------------------- the unit file

HARDENING = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "User": "dicom-proxy",
    "Group": "dicom-proxy",
    "UMask": "0077",
    "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateIPC": "yes",
    "PrivateMounts": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "RemoveIPC": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
}


@pytest.mark.parametrize(("key", "value"), sorted(HARDENING.items()))
def test_unit_keeps_its_hardening(key: str, value: str) -> None:
    assert value in values(key), f"{UNIT.name}: expected {key}={value}, have {values(key)}"


def test_unit_denies_privileged_syscalls_and_other_capabilities() -> None:
    assert "~@privileged @resources" in values("SystemCallFilter")
    assert values("CapabilityBoundingSet") == ["CAP_NET_BIND_SERVICE"]
    assert values("PrivateUsers") == []  # it would void CAP_NET_BIND_SERVICE for port 104


def test_unit_watchdog_and_stop_timeouts_fit_the_proxy() -> None:
    from proxy.config import Timeouts

    (watchdog,) = values("WatchdogSec")
    (stop,) = values("TimeoutStopSec")
    # The graceful drain (timeouts.shutdown) plus the 3 s abort grace must fit in TimeoutStopSec.
    assert float(stop) > Timeouts().shutdown + 3
    assert float(watchdog) >= 10


def test_unit_commands_match_the_cli() -> None:
    from proxy.cli import build_parser

    parser = build_parser()
    commands = values("ExecStart") + [v for v in values("ExecReload") if "dicom-proxy" in v]
    assert len(commands) == 2
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == INSTALLED_BINARY
        args = parser.parse_args(argv[1:])
        assert args.config == "/etc/dicom-proxy/proxy.yaml"
    assert values("ExecReload")[-1] == "/bin/kill -HUP $MAINPID"  # check first, signal last


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    copy = unit_copy(tmp_path)
    result = subprocess.run([analyze(), "verify", str(copy)], capture_output=True, text=True, timeout=60,
                            check=False)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if copy.name in line or str(tmp_path) in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ours == [], "\n".join(ours)


def _supports_offline_security() -> bool:
    out = subprocess.run([analyze(), "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"systemd (\d+)", out)
    return match is not None and int(match.group(1)) >= 250


def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    if not _supports_offline_security():
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    result = subprocess.run(
        [analyze(), "security", "--offline=true", "--no-pager", str(unit_copy(tmp_path))],
        capture_output=True, text=True, timeout=60, check=False,
    )
    match = re.search(r"Overall exposure level for dicom-proxy\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout


# --------------------------------------------------------------------------- sysusers.d and tmpfiles.d


def test_sysusers_and_tmpfiles_build_the_layout(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    sysusers = require_tool("systemd-sysusers")
    tmpfiles = require_tool("systemd-tmpfiles")
    subprocess.run([sysusers, f"--root={root}", str(SYSUSERS)], check=True, capture_output=True, timeout=60)
    passwd = (root / "etc" / "passwd").read_text()
    group = (root / "etc" / "group").read_text()
    user = next(line.split(":") for line in passwd.splitlines() if line.startswith("dicom-proxy:"))
    gid = int(next(line.split(":") for line in group.splitlines() if line.startswith("dicom-proxy:"))[2])
    assert user[6] in ("/usr/sbin/nologin", "/sbin/nologin")  # a system user, no login
    assert int(user[2]) < 1000

    # What an admin copied in before running tmpfiles: a world-readable key, a rule file.
    etc = root / "etc" / "dicom-proxy"
    (etc / "certs").mkdir(parents=True)
    (etc / "rules").mkdir()
    (etc / "proxy.yaml").write_text("listeners: []\n")
    (etc / "certs" / "proxy.key").write_text("key\n")
    (etc / "certs" / "proxy.key").chmod(0o644)
    (etc / "rules" / "site.yaml").write_text("version: 1\n")
    subprocess.run([tmpfiles, "--create", f"--root={root}", str(TMPFILES)], check=True, capture_output=True,
                   timeout=60)

    def mode(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return stat.filemode(st.st_mode), st.st_uid, st.st_gid

    assert mode(etc) == ("drwxr-x---", 0, gid)
    assert mode(etc / "proxy.yaml") == ("-rw-r-----", 0, gid)
    for folder in ("rules", "certs"):
        assert mode(etc / folder) == ("drwxr-x---", 0, gid)
    assert mode(etc / "certs" / "proxy.key") == ("-rw-r-----", 0, gid)
    assert mode(etc / "rules" / "site.yaml") == ("-rw-r-----", 0, gid)


# --------------------------------------------------------------------------- the seccomp sandbox

SANDBOX_LAUNCHER = textwrap.dedent(
    r'''
    import ctypes, json, os, sys

    spec = json.loads(sys.argv[1])
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(Cmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ALLOW, KILL_PROCESS = 0x7FFF0000, 0x80000000
    ERRNO = lambda e: 0x00050000 | e
    EQ, MASKED_EQ = 4, 7

    def nr(name):
        return lib.seccomp_syscall_resolve_name(name.encode())

    def rule(ctx, action, name, *cmps):
        number = nr(name)
        if number < 0:
            return
        array = (Cmp * len(cmps))(*[Cmp(*c) for c in cmps]) if cmps else None
        rc = lib.seccomp_rule_add_array(ctx, action, number, len(cmps), array)
        if rc < 0 and rc != -17:  # EEXIST
            raise SystemExit(f"seccomp_rule_add {name}: {rc}")

    def load(ctx):
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise SystemExit(f"seccomp_load: {rc}")
        lib.seccomp_release(ctx)

    # MemoryDenyWriteExecute=yes, as systemd 252 builds it (seccomp_memory_deny_write_execute).
    PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
    ctx = lib.seccomp_init(ALLOW)
    for name in ("mmap", "mmap2"):
        rule(ctx, ERRNO(1), name, (2, MASKED_EQ, PROT_EXEC | PROT_WRITE, PROT_EXEC | PROT_WRITE))
    for name in ("mprotect", "pkey_mprotect"):
        rule(ctx, ERRNO(1), name, (2, MASKED_EQ, PROT_EXEC, PROT_EXEC))
    rule(ctx, ERRNO(1), "shmat", (2, MASKED_EQ, SHM_EXEC, SHM_EXEC))
    load(ctx)
    # RestrictAddressFamilies=: socket() in any other family fails with EAFNOSUPPORT.
    ctx = lib.seccomp_init(ALLOW)
    for family in range(0, 64):
        if family not in spec["families"]:
            rule(ctx, ERRNO(97), "socket", (0, EQ, family, 0))
    load(ctx)
    # SystemCallFilter=: the allow list, loaded last like systemd does (it may deny seccomp() itself);
    # anything else gets the default action.
    default = KILL_PROCESS if spec["default"] == "kill" else ERRNO(1)
    ctx = lib.seccomp_init(default)
    for name in spec["allow"]:
        rule(ctx, ALLOW, name)
    load(ctx)
    os.execv(sys.argv[2], sys.argv[2:])
    '''
)


@cache
def _syscall_group(name: str) -> frozenset[str]:
    out = subprocess.run([analyze(), "syscall-filter", "--no-pager", name], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    names: set[str] = set()
    for raw in out.splitlines()[1:]:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        names |= _syscall_group(line) if line.startswith("@") else {line}
    return frozenset(names)


def _expand(spec: str) -> set[str]:
    names: set[str] = set()
    for item in spec.split():
        names |= _syscall_group(item) if item.startswith("@") else {item}
    return names


def sandbox_spec(default: str) -> str:
    """The unit's SystemCallFilter= lines in order (allow list, then ~deny lists) and its
    RestrictAddressFamilies=, as JSON for SANDBOX_LAUNCHER."""
    allowed: set[str] = set()
    for line in values("SystemCallFilter"):
        if line.startswith("~"):
            allowed -= _expand(line[1:])
        else:
            allowed |= _expand(line)
    families = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}
    wanted = [families[f] for f in values("RestrictAddressFamilies")[0].split()]
    return json.dumps({"allow": sorted(allowed), "default": default, "families": wanted})


def require_libseccomp() -> None:
    import ctypes

    try:
        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        from tests.peers import missing

        missing("libseccomp.so.2 (Debian: libseccomp2, installed with systemd)")


PROBE = textwrap.dedent(
    """
    import errno, mmap, socket, sys
    what = sys.argv[1]
    if what == "wx":
        try:
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except PermissionError:
            print("wx refused")
    elif what == "netlink":
        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        except OSError as exc:
            print("netlink refused" if exc.errno == errno.EAFNOSUPPORT else exc)
    elif what == "chroot":  # @privileged, denied by the unit
        import os
        os.chroot("/")
        print("chroot allowed")
    elif what == "affinity":  # @resources, denied by the unit
        import os
        try:
            os.sched_setaffinity(0, os.sched_getaffinity(0))
        except PermissionError:
            print("affinity refused")
    elif what == "ok":
        import ssl, asyncio, cryptography.hazmat.primitives.asymmetric.ec as ec
        ec.generate_private_key(ec.SECP256R1())
        asyncio.run(asyncio.sleep(0))
        print("ok", ssl.OPENSSL_VERSION)
    """
)


def _probe(what: str, default: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SANDBOX_LAUNCHER, sandbox_spec(default), sys.executable, "-c", PROBE, what],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT,
    )


def test_sandbox_emulation_bites() -> None:
    """The emulated filters are real: W+X memory, netlink sockets and @resources are refused."""
    require_libseccomp()
    assert _probe("wx", "eperm").stdout.strip() == "wx refused"
    assert _probe("netlink", "eperm").stdout.strip() == "netlink refused"
    killed = _probe("chroot", "kill")
    assert killed.returncode == -signal.SIGSYS, (killed.returncode, killed.stdout, killed.stderr)
    assert _probe("affinity", "eperm").stdout.strip() == "affinity refused"
    ok = _probe("ok", "kill")
    assert ok.returncode == 0 and ok.stdout.startswith("ok OpenSSL"), ok.stderr


def test_proxy_relays_tls_under_the_unit_sandbox(tmp_path: Path, dev_certs: Pki) -> None:
    """`dicom-proxy run` under the unit's seccomp filters, with a default action that KILLS (stricter
    than the unit's SystemCallErrorNumber=EPERM): start, load keys with cryptography, a TLS listener
    and a TLS upstream through OpenSSL, a C-ECHO end to end, SIGHUP reload, SIGTERM, exit 0."""
    require_libseccomp()
    require_tool("systemd-analyze")
    from pynetdicom import AE

    from tests.peers import tls_server_context

    archive = PynetdicomArchive(
        ssl_context=tls_server_context(dev_certs.archive_cert, dev_certs.archive_key, dev_certs.ca)
    ).start()
    port = free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump({
        "listeners": [{"name": "modalities", "address": f"{LOOPBACK}:{port}",
                       "tls": {"cert": str(dev_certs.proxy_cert), "key": str(dev_certs.proxy_key),
                               "client_ca": str(dev_certs.ca)}}],
        "upstreams": {"pacs": {"address": f"{LOOPBACK}:{archive.port}",
                               "tls": {"ca": str(dev_certs.ca), "cert": str(dev_certs.proxy_cert),
                                       "key": str(dev_certs.proxy_key), "server_name": "localhost"}}},
        "default_upstream": "pacs",
    }))
    argv = [sys.executable, "-c", SANDBOX_LAUNCHER, sandbox_spec("kill"),
            sys.executable, "-m", "proxy", "run", "-c", str(config)]
    peer = Peer("proxy-sandboxed", argv, tmp_path / "proxy.log", cwd=REPO_ROOT,
                env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1")).start()
    try:
        wait_for_line(peer, r"listening on 127\.0\.0\.1:\d+", 20)
        from tests.peers import tls_client_context

        def echo() -> int:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context("1.2.840.10008.1.1")
            ctx = tls_client_context(dev_certs.ca, dev_certs.modality_cert, dev_certs.modality_key)
            assoc = ae.associate(LOOPBACK, port, ae_title="ARCHIVE", tls_args=(ctx, "localhost"))
            assert assoc.is_established, peer.log_text()
            status = int(assoc.send_c_echo().Status)
            assoc.release()
            return status

        assert echo() == 0
        since = peer.log_size()
        peer.signal(signal.SIGHUP)
        wait_for_line(peer, r"configuration reloaded", 10, since=since)
        assert echo() == 0
        assert peer.stop(20) == 0, peer.log_text()
    finally:
        peer.stop()
        archive.stop()
