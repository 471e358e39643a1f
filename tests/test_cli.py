"""The dicom-proxy command line: exit codes and the messages an admin reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy import __version__

CLI = [sys.executable, "-m", "proxy"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.fixture
def certs_dir(tmp_path: Path) -> Path:
    out = _run("certs", "init", str(tmp_path / "certs"))
    assert out.returncode == 0, out.stderr
    return tmp_path / "certs"


def _write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(body)
    return path


VALID = """\
listeners:
  - name: modalities
    address: 127.0.0.1:11112
upstreams:
  pacs:
    address: 127.0.0.1:2762
    tls:
      ca: certs/ca.pem
      cert: certs/proxy.pem
      key: certs/proxy.key
      server_name: localhost
routes:
  PACS: pacs
default_upstream: pacs
timeouts: {artim: 30, connect: 10, idle: 300}
"""


def test_version() -> None:
    out = _run("--version")
    assert out.returncode == 0
    assert __version__ in out.stdout


def test_check_accepts_the_contract_example(tmp_path: Path, certs_dir: Path) -> None:
    path = _write_config(tmp_path, VALID)
    out = _run("check", "-c", str(path))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_check_reports_every_error_with_location_and_caret(tmp_path: Path, certs_dir: Path) -> None:
    broken = VALID.replace("server_name: localhost", "server_nam: localhost").replace(
        "address: 127.0.0.1:2762", "address: 127.0.0.1:99999"
    )
    path = _write_config(tmp_path, broken)
    out = _run("check", "-c", str(path))
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 2, out.stderr
    assert any(line.startswith(f"{path}:11:7: error:") and "server_nam" in line for line in errors), out.stderr
    assert any(line.startswith(f"{path}:6:14: error:") and "99999" in line for line in errors), out.stderr
    # the offending line and a caret under the column follow each error
    assert "      server_nam: localhost" in out.stderr
    assert any(line.strip() == "^" for line in lines)


def test_check_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    out = _run("check", "-c", str(tmp_path / "nope.yaml"))
    assert out.returncode == 1
    assert "nope.yaml" in out.stderr
    assert "Traceback" not in out.stderr


def test_usage_error_exit_code() -> None:
    out = _run("run")
    assert out.returncode == 2


def test_certs_init_refuses_to_overwrite_a_ca(tmp_path: Path, certs_dir: Path) -> None:
    before = (certs_dir / "ca.pem").read_bytes()
    out = _run("certs", "init", str(certs_dir))
    assert out.returncode == 1
    assert (certs_dir / "ca.pem").read_bytes() == before
    forced = _run("certs", "init", str(certs_dir), "--force")
    assert forced.returncode == 0
    assert (certs_dir / "ca.pem").read_bytes() != before


def test_run_with_invalid_config_exits_1_without_traceback(tmp_path: Path) -> None:
    path = _write_config(tmp_path, "listeners: []\n")
    out = _run("run", "-c", str(path))
    assert out.returncode == 1
    assert ": error: " in out.stderr
    assert "Traceback" not in out.stderr


def _hash(*args: str, passcode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "passcode-hash", *args], input=passcode + "\n", capture_output=True, text=True,
                          timeout=60)


def test_passcode_hash_adds_then_replaces_a_user_and_the_proxy_accepts_the_line(tmp_path: Path) -> None:
    from proxy import identity

    path = tmp_path / "passcodes"
    path.write_text("# modalities that log in\nmr-tech:scrypt$2$1$1$AAAAAAAAAAA$" + "A" * 43 + "\n")
    path.chmod(0o640)
    first = _hash("--user", "ct-tech", "--file", str(path), "-N", "1024", passcode="first secret")
    assert first.returncode == 0, first.stderr
    assert "user 'ct-tech' added" in first.stdout
    second = _hash("--user", "ct-tech", "--file", str(path), "-N", "1024", passcode="second secret")
    assert second.returncode == 0, second.stderr
    assert "user 'ct-tech' replaced" in second.stdout
    for out in (first, second):
        assert "secret" not in out.stdout + out.stderr
    table = identity.parse_passcode_file(path.read_bytes())
    assert sorted(table) == ["ct-tech", "mr-tech"]  # the comment and the other user are kept
    assert identity.check_passcode(table, "ct-tech", b"second secret")
    assert not identity.check_passcode(table, "ct-tech", b"first secret")
    assert path.read_text().startswith("# modalities that log in\n")
    assert path.stat().st_mode & 0o777 == 0o640  # the admin's mode is kept


def test_passcode_hash_new_file_is_private_and_prints_without_a_file(tmp_path: Path) -> None:
    path = tmp_path / "new-passcodes"
    out = _hash("--user", "us-01", "--file", str(path), "-N", "1024", passcode="pw")
    assert out.returncode == 0, out.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    printed = _hash("--user", "us-01", "-N", "1024", passcode="pw")
    assert printed.returncode == 0
    assert printed.stdout.startswith("us-01:scrypt$1024$8$1$")


@pytest.mark.parametrize(
    ("args", "passcode", "message"),
    [
        (("--user", "a:b"), "pw", "must not be empty, contain ':'"),
        (("--user", "ct"), "", "empty passcode"),
        (("--user", "ct", "-N", "1000"), "pw", "scrypt N must be a power of 2"),
    ],
)
def test_passcode_hash_refuses_bad_input(args: tuple[str, ...], passcode: str, message: str) -> None:
    out = _hash(*args, passcode=passcode)
    assert out.returncode == 1
    assert message in out.stderr


def test_passcode_hash_never_rewrites_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "passcodes"
    path.write_text("tech:scrypt$16384$8$1$c2FsdHNhbHQ$" + "A" * 43 + "\nthis line is not a passcode entry\n")
    before = path.read_bytes()
    out = _hash("--user", "ct", "--file", str(path), "-N", "1024", passcode="pw")
    assert out.returncode == 1
    assert "line 2: expected 'username:scrypt$N$r$p$salt$hash'" in out.stderr
    assert path.read_bytes() == before
