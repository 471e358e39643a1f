"""dicom-proxy sub-commands. Exit codes: 0 ok, 1 invalid input or failure, 2 usage."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from proxy import __version__
from proxy.errors import ConfigError, ConfigErrors, ProxyError

if TYPE_CHECKING:
    from proxy.config import ProxyConfig

log = logging.getLogger("proxy")


def _print_config_errors(exc: ConfigErrors | ConfigError) -> None:
    errors = exc.errors if isinstance(exc, ConfigErrors) else [exc]
    for err in errors:
        print(err.render(with_caret=True), file=sys.stderr)


def _load_config(path: str) -> ProxyConfig | None:
    """The configuration, or None after printing every error as path:line:col: error: ..."""
    from proxy import config

    try:
        return config.load(Path(path))
    except (ConfigErrors, ConfigError) as exc:
        _print_config_errors(exc)
    except OSError as exc:
        print(f"{path}: error: {exc.strerror or exc}", file=sys.stderr)
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from proxy import logsetup, server

    level, fmt = args.log_level, args.log_format
    if level is None or fmt is None:
        # the configuration's log_level/log_format apply unless the command line says otherwise
        from proxy import config as config_mod

        try:
            loaded = config_mod.load(Path(args.config))
            level, fmt = level or loaded.log_level, fmt or loaded.log_format
        except (ConfigErrors, ConfigError, OSError):
            level, fmt = level or "info", fmt or "text"  # server.run reports the errors
    logsetup.configure(level, fmt)
    log.info("dicom-tls-proxy %s starting with %s", __version__, args.config)
    try:
        return asyncio.run(server.run(Path(args.config)))
    except (ConfigErrors, ConfigError) as exc:
        _print_config_errors(exc)
        return 1
    except (ProxyError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1


def cmd_check(args: argparse.Namespace) -> int:

    cfg = _load_config(args.config)
    if cfg is None:
        return 1
    for warning in cfg.warnings:
        print(warning, file=sys.stderr)
    rules = f", {len(cfg.rules.rules)} rule(s)" if cfg.rules is not None else ""
    print(
        f"{args.config}: ok ({len(cfg.listeners)} listener(s), {len(cfg.upstreams)} upstream(s), "
        f"{len(cfg.routes)} route(s){rules}, {len(cfg.warnings)} warning(s))"
    )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Which rule decides an association (and a DIMSE request), and why every earlier rule did not."""
    import ipaddress
    from datetime import datetime

    from proxy.policy.engine import explain, format_explanation
    from proxy.policy.model import AssociationFacts, DimseFacts, IdentityFacts

    cfg = _load_config(args.config)
    if cfg is None:
        return 1
    if cfg.rules is None:
        print(f"{args.config}: no rules: every association is accepted and routed by called AE title")
        return 0
    try:
        source = ipaddress.ip_address(args.source)
        now = datetime.fromisoformat(args.time) if args.time else datetime.now()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    listener = args.listener or cfg.listeners[0].name
    identity = IdentityFacts(args.identity_type, args.username) if args.identity_type else None
    facts = AssociationFacts(
        source=source,
        listener=listener,
        calling_ae=args.calling_ae,
        called_ae=args.called_ae,
        abstract_syntaxes=tuple(args.abstract_syntax),
        transfer_syntaxes=tuple(args.transfer_syntax),
        user_identity=identity,
        now=now,
    )
    dimse = None
    if args.command:
        dimse = DimseFacts(
            command=args.command.upper(),
            affected_sop_class=args.affected_sop_class,
            move_destination=args.move_destination,
            priority=args.priority,
        )
    print(format_explanation(explain(cfg.rules, facts, dimse)))
    return 0


def cmd_certs_init(args: argparse.Namespace) -> int:
    from proxy import certs

    try:
        written = certs.init(Path(args.directory), force=args.force)
    except ProxyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for role, path in written.items():
        print(f"{role:>16}: {path}")
    print("development certificates only: never use this CA in production")
    return 0


def cmd_certs_issue(args: argparse.Namespace) -> int:
    """One device certificate from the development CA in --ca (written by `certs init`)."""
    from proxy import certs

    ca_dir = Path(args.ca)
    out_dir = Path(args.out) if args.out is not None else ca_dir
    if not args.cn.strip():
        print("error: --cn must not be empty", file=sys.stderr)
        return 2
    if args.days < 1:
        print("error: --days must be at least 1", file=sys.stderr)
        return 2
    sans = [s.strip() for entry in args.san or [] for s in entry.split(",") if s.strip()]
    try:
        cert_path, key_path = certs.issue(
            ca_dir, out_dir, args.cn, sans, client=args.client, days=args.days, name=args.name, force=args.force
        )
    except certs.PKIExistsError as exc:
        print(f"error: {exc}".replace("(use force ", "(use --force "), file=sys.stderr)
        return 1
    except (ProxyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = exc.filename or ca_dir
        print(f"error: cannot use the CA in {ca_dir} ({where}: {exc.strerror or exc}); "
              "create one with `dicom-proxy certs init DIR`", file=sys.stderr)
        return 1
    usage = "client authentication only" if args.client else "server and client authentication"
    ca_end = certs.load_ca(ca_dir).cert.not_valid_after_utc
    if ca_end < certs.load_certificate(cert_path).not_valid_after_utc:
        print(f"warning: the CA expires on {ca_end:%Y-%m-%d}, before this certificate does; "
              "peers will reject it from then on", file=sys.stderr)
    print(f"{'certificate':>16}: {cert_path}")
    print(f"{'key':>16}: {key_path}")
    print(f"{'ca':>16}: {ca_dir / certs.CA_CERT}")
    print(f"issued CN={args.cn} for {usage}, valid {args.days} day(s); development certificates only")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    """One C-ECHO association to an upstream, as the health probes make it, each step timed."""
    from proxy import upstream

    cfg = _load_config(args.config)
    if cfg is None:
        return 1
    return upstream.run_echo(cfg, args.upstream, called_ae=args.called_ae, calling_ae=args.calling_ae,
                             timeout=args.timeout)


def _read_passcode(from_stdin: bool) -> str | None:
    """The passcode from a terminal prompt (asked twice) or the first line of stdin; never argv,
    which other users can read in the process list."""
    import getpass

    if from_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    first = getpass.getpass("passcode: ")
    if getpass.getpass("again: ") != first:
        print("error: the two passcodes differ", file=sys.stderr)
        return None
    return first


def cmd_passcode_hash(args: argparse.Namespace) -> int:
    """Add or replace one user's line in a `client_identity.passcodes` file (or print it)."""
    import os

    from proxy import passcodes

    passcode = _read_passcode(args.stdin)
    if passcode is None:
        return 1
    if not passcode:
        print("error: empty passcode", file=sys.stderr)
        return 1
    try:
        line = passcodes.hash_passcode_line(args.user, passcode, os.urandom(passcodes.SALT_BYTES),
                                            n=args.n, r=args.r, p=args.p)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.file is None:
        print(line)
        return 0
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        updated, replaced = passcodes.with_user_line(text, args.user, line)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        print(f"{path}: error: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(updated)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except OSError as exc:
        print(f"{path}: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"{path}: user {args.user!r} {'replaced' if replaced else 'added'} (scrypt N={args.n} r={args.r} p={args.p})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy import demo

    return demo.run_demo(Path(args.workdir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-proxy", description="Transparent TLS-terminating DICOM proxy")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy in the foreground (logs to stderr)")
    run.add_argument("-c", "--config", required=True, help="proxy.yaml")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default: log_level")
    run.add_argument("--log-format", choices=["text", "json"], help="default: log_format (text)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a configuration; errors as path:line:col")
    check.add_argument("-c", "--config", required=True)
    check.set_defaults(func=cmd_check)

    exp = sub.add_parser("explain", help="show which rule decides an association or DIMSE request, and why")
    exp.add_argument("-c", "--config", required=True)
    exp.add_argument("--source", required=True, help="client IP address")
    exp.add_argument("--calling-ae", required=True)
    exp.add_argument("--called-ae", required=True)
    exp.add_argument("--listener", help="listener name (default: the first)")
    exp.add_argument("--abstract-syntax", action="append", default=[], metavar="UID")
    exp.add_argument("--transfer-syntax", action="append", default=[], metavar="UID")
    exp.add_argument("--identity-type", type=int, choices=[1, 2, 3, 4, 5])
    exp.add_argument("--username")
    exp.add_argument("--time", help="local time, ISO 8601 (default: now)")
    exp.add_argument("--command", help="a DIMSE request, e.g. C-MOVE")
    exp.add_argument("--move-destination")
    exp.add_argument("--affected-sop-class", metavar="UID")
    exp.add_argument("--priority", type=int, choices=[0, 1, 2])
    exp.set_defaults(func=cmd_explain)

    certs = sub.add_parser("certs", help="development certificates")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_sub.add_parser("init", help="create a development CA and server/client certificates")
    init.add_argument("directory")
    init.add_argument("--force", action="store_true", help="overwrite an existing CA")
    init.set_defaults(func=cmd_certs_init)
    issue = certs_sub.add_parser("issue", help="issue one device certificate from a development CA")
    issue.add_argument("--ca", required=True, metavar="DIR", help="folder written by `certs init`")
    issue.add_argument("--cn", required=True, metavar="NAME", help="subject common name (e.g. the device name)")
    issue.add_argument("--san", action="append", metavar="NAME",
                       help="subject alternative name: a DNS name or IP address (DNS:/IP: prefixes accepted); "
                            "repeat it or separate with commas")
    issue.add_argument("--client", action="store_true",
                       help="client-only certificate (a modality); default: server and client")
    issue.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    issue.add_argument("--out", metavar="DIR", help="where to write NAME.pem and NAME.key (default: the CA folder)")
    issue.add_argument("--name", metavar="STEM", help="file name stem (default: derived from --cn)")
    issue.add_argument("--force", action="store_true", help="overwrite existing files")
    issue.set_defaults(func=cmd_certs_issue)

    echo = sub.add_parser("echo", help="C-ECHO an upstream through its TLS settings; time each step")
    echo.add_argument("-c", "--config", required=True)
    echo.add_argument("upstream", help="upstream name in proxy.yaml")
    echo.add_argument("--called-ae", help="default: health.called_ae of the upstream, else ANY-SCP")
    echo.add_argument("--calling-ae", help="default: health.calling_ae of the upstream, else DICOMPROXY")
    echo.add_argument("--timeout", type=float, help="seconds for the whole probe (default: health.timeout, else 5)")
    echo.set_defaults(func=cmd_echo)

    ph = sub.add_parser("passcode-hash", help="add a user's salted passcode hash to a client_identity passcodes file")
    ph.add_argument("--user", required=True, help="the user name a modality sends")
    ph.add_argument("--file", metavar="PATH", help="passcodes file to update (default: print the line)")
    ph.add_argument("--stdin", action="store_true", help="read the passcode from stdin even on a terminal")
    ph.add_argument("-N", dest="n", type=int, default=2**14, help="scrypt N (default 16384)")
    ph.add_argument("-r", dest="r", type=int, default=8, help="scrypt r (default 8)")
    ph.add_argument("-p", dest="p", type=int, default=1, help="scrypt p (default 1)")
    ph.set_defaults(func=cmd_passcode_hash)

    demo = sub.add_parser("demo", help="run the end-to-end demo (TLS-only archive, proxy, sample images)")
    demo.add_argument("--workdir", default="demo-run")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
