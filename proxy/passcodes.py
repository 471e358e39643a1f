"""Salted passcode hashes for `client_identity: verify` (User Identity type 2): one
`username:scrypt$N$r$p$salt$hash` line per user, written by `dicom-proxy passcode-hash`.

Pure: no files are read here (proxy.identity's FileCache does that), nothing is logged, and no
message carries a passcode.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from proxy.errors import SafeValueError

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
"""Defaults for new lines (16 MiB, tens of milliseconds); each line records its own parameters."""
_SCRYPT_MAX_N, _SCRYPT_MAX_R, _SCRYPT_MAX_P = 2**20, 32, 16
SALT_BYTES = 16
_USERNAME = re.compile(r"[^:\s#][^:\r\n]*")


@dataclass(frozen=True)
class PasscodeHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes = field(repr=False)

    def matches(self, passcode: bytes) -> bool:
        return hmac.compare_digest(_scrypt(passcode, self.salt, self.n, self.r, self.p, len(self.digest)),
                                   self.digest)


def _scrypt(passcode: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(passcode, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=129 * n * r * p + (1 << 20))


def _check_scrypt_parameters(n: int, r: int, p: int) -> None:
    if n < 2 or n & (n - 1) or n > _SCRYPT_MAX_N:
        raise SafeValueError(f"scrypt N must be a power of 2 from 2 to {_SCRYPT_MAX_N}, got {n}")
    if not 1 <= r <= _SCRYPT_MAX_R or not 1 <= p <= _SCRYPT_MAX_P:
        raise SafeValueError(f"scrypt r must be 1-{_SCRYPT_MAX_R} and p 1-{_SCRYPT_MAX_P}, got r={r} p={p}")


def hash_passcode_line(
    username: str, passcode: str | bytes, salt: bytes, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
) -> str:
    """One line of a passcode file: `username:scrypt$N$r$p$salt_b64$hash_b64` (standard base64
    without padding; a 32-byte hash). `salt` must be SALT_BYTES fresh random bytes (the caller
    passes os.urandom(16)); the CLI writes the line to the file."""
    if not _USERNAME.fullmatch(username) or username != username.strip():
        raise ValueError("a user name must not be empty, contain ':' or a line break, or start with '#' "
                         "or end with spaces")
    if len(salt) < 8:
        raise ValueError("the salt must be at least 8 random bytes")
    _check_scrypt_parameters(n, r, p)
    secret = passcode.encode("utf-8") if isinstance(passcode, str) else passcode
    digest = _scrypt(secret, salt, n, r, p, 32)
    return f"{username}:scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SafeValueError("not base64") from None


def parse_passcode_file(data: bytes) -> Mapping[str, PasscodeHash]:
    """`username:scrypt$N$r$p$salt_b64$hash_b64` per line; `#` comments and blank lines ignored.
    SafeValueError names the line of the first malformed entry or duplicate user."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SafeValueError("the file is not UTF-8") from None
    out: dict[str, PasscodeHash] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, spec = line.rpartition(":")
        fields = spec.split("$")
        if not sep or not user or len(fields) != 6 or fields[0] != "scrypt":
            raise SafeValueError(f"line {number}: expected 'username:scrypt$N$r$p$salt$hash'")
        try:
            n, r, p = int(fields[1]), int(fields[2]), int(fields[3])
        except ValueError:
            raise SafeValueError(f"line {number}: N, r and p must be integers") from None
        try:
            _check_scrypt_parameters(n, r, p)
            salt, digest = _unb64(fields[4]), _unb64(fields[5])
        except SafeValueError as exc:
            raise SafeValueError(f"line {number}: {exc}") from None
        if len(digest) < 16 or len(salt) < 8:
            raise SafeValueError(f"line {number}: salt or hash too short")
        if user in out:
            raise SafeValueError(f"line {number}: user {user!r} is listed twice")
        out[user] = PasscodeHash(n, r, p, salt, digest)
    return MappingProxyType(out)


_DUMMY_HASH = PasscodeHash(SCRYPT_N, SCRYPT_R, SCRYPT_P, b"\x00" * SALT_BYTES, b"\x00" * 32)


def check_passcode(table: Mapping[str, PasscodeHash], username: str, passcode: bytes) -> bool:
    """True when `username` is in the table and the passcode matches. An unknown user costs the
    same scrypt work as a known one, so timing does not tell which user names exist."""
    entry = table.get(username)
    if entry is None:
        _DUMMY_HASH.matches(passcode)
        return False
    return entry.matches(passcode)


def with_user_line(text: str, username: str, line: str) -> tuple[str, bool]:
    """`text` (a passcodes file) with `line` as `username`'s entry: (new text, True if it replaced
    one). Comments, blank lines and other users stay as they are. SafeValueError (with the line
    number) when `text` is not a valid passcodes file, so a broken file is never rewritten."""
    parse_passcode_file(text.encode("utf-8"))
    kept: list[str] = []
    replaced = False
    for row in text.splitlines():
        entry = row.strip()
        if entry and not entry.startswith("#") and entry.rpartition(":")[0] == username:
            replaced = True
            continue
        kept.append(row)
    return "\n".join([*kept, line]) + "\n", replaced

