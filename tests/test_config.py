"""proxy.yaml loading: the example contract loads, and every mistake is reported where it is."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from proxy import certs, config, yamlsrc
from proxy.config import Address, ConfigErrors, UpstreamTLS
from proxy.dul.constants import DEFAULT_MAX_PDU_LENGTH
from proxy.errors import ConfigError

EXAMPLE = """\
listeners:
  - name: modalities
    address: 127.0.0.1:11112
upstreams:
  pacs:
    address: 127.0.0.1:2762
    tls:
      ca: certs/ca.pem           # trust anchor for the archive's certificate
      cert: certs/proxy.pem      # optional client certificate and key
      key: certs/proxy.key
      server_name: localhost     # SNI and hostname check
routes:                          # called AE title -> upstream name
  PACS: pacs
default_upstream: pacs
timeouts: {artim: 30, connect: 10, idle: 300}
"""

MINIMAL = """\
listeners:
  - {name: l, address: "127.0.0.1:0"}
upstreams:
  pacs: {address: "127.0.0.1:104"}
default_upstream: pacs
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return certs.init(tmp_path_factory.mktemp("pki") / "certs")


@pytest.fixture
def site(tmp_path: Path, pki: dict[str, Path]) -> Path:
    """A config folder with certs/ beside it, as an admin would lay it out."""
    (tmp_path / "certs").symlink_to(pki["ca"].parent)
    return tmp_path


def write(folder: Path, text: str, name: str = "proxy.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(path: Path) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as info:
        config.load(path)
    return info.value.errors


def one_error(path: Path) -> str:
    errors = errors_of(path)
    assert len(errors) == 1, [e.render() for e in errors]
    return errors[0].render()


# --------------------------------------------------------------------------- valid files


def test_example_loads_with_resolved_paths(site: Path) -> None:
    cfg = config.load(write(site, EXAMPLE))
    assert cfg.listeners == (config.Listener("modalities", Address("127.0.0.1", 11112)),)
    pacs = cfg.upstreams["pacs"]
    assert pacs.address == Address("127.0.0.1", 2762)
    assert pacs.tls == UpstreamTLS(
        ca=site / "certs/ca.pem",
        cert=site / "certs/proxy.pem",
        key=site / "certs/proxy.key",
        server_name="localhost",
    )
    assert pacs.tls.ca is not None and pacs.tls.ca.is_absolute()
    assert dict(cfg.routes) == {"PACS": "pacs"}
    assert cfg.default_upstream == "pacs"
    assert (cfg.timeouts.artim, cfg.timeouts.connect, cfg.timeouts.idle) == (30.0, 10.0, 300.0)
    assert cfg.timeouts.acse == config.Timeouts().acse  # unset keys keep their defaults
    assert cfg.max_pdu_length == DEFAULT_MAX_PDU_LENGTH
    assert pacs.server_hostname == "localhost"
    assert cfg.upstream_for("PACS ") is pacs
    assert cfg.upstream_for("ANYTHING") is pacs


def test_relative_paths_resolve_against_the_config_folder_not_the_cwd(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(site, EXAMPLE)
    monkeypatch.chdir("/")
    cfg = config.load(path)
    tls = cfg.upstreams["pacs"].tls
    assert tls is not None and tls.ca == site / "certs/ca.pem"


def test_plaintext_and_system_trust_store(tmp_path: Path) -> None:
    cfg = config.load(
        write(
            tmp_path,
            """\
            listeners:
              - {name: l, address: "[::1]:0"}
            upstreams:
              plain: {address: "archive.example:104"}
              secure: {address: "[2001:db8::1]:2762", tls: {}}
            routes: {"  CT01 ": secure}
            max_pdu_length: 4096
            max_associate_length: 16777216
            """,
        )
    )
    assert cfg.listeners[0].address == Address("::1", 0)
    assert str(cfg.listeners[0].address) == "[::1]:0"
    assert cfg.upstreams["plain"].tls is None
    assert cfg.upstreams["plain"].server_hostname is None
    assert cfg.upstreams["secure"].tls == UpstreamTLS()
    assert cfg.upstreams["secure"].server_hostname == "2001:db8::1"
    assert dict(cfg.routes) == {"CT01": "secure"}
    assert cfg.default_upstream is None
    assert cfg.upstream_for("OTHER") is None
    assert (cfg.max_pdu_length, cfg.max_associate_length) == (4096, 16 * 1024 * 1024)


# --------------------------------------------------------------------------- one error each


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            MINIMAL + "listner: x\n",
            r"proxy.yaml:6:1: error: unknown key 'listner' in the top level \(expected one of: 'listeners', ",
            id="unknown-top-key",
        ),
        pytest.param(
            MINIMAL.replace("address: \"127.0.0.1:104\"", "address: \"127.0.0.1:104\", tsl: {}"),
            r"proxy.yaml:4:36: error: unknown key 'tsl' in upstream 'pacs' "
            r"\(expected one of: 'address', 'tls', 'health'\)",
            id="unknown-upstream-key",
        ),
        pytest.param(
            MINIMAL + "default_upstream: other\n",
            r"proxy.yaml:6:1: error: duplicate key 'default_upstream' \(first defined at line 5, column 1\)",
            id="duplicate-key",
        ),
        pytest.param(
            MINIMAL.replace("127.0.0.1:104", "127.0.0.1"),
            r"proxy.yaml:4:19: error: the address of upstream 'pacs': '127.0.0.1': expected host:port",
            id="address-without-port",
        ),
        pytest.param(
            MINIMAL.replace("127.0.0.1:104", "127.0.0.1:70000"),
            r"proxy.yaml:4:19: error: .*the port must be a number from 1 to 65535",
            id="port-too-big",
        ),
        pytest.param(
            MINIMAL.replace("127.0.0.1:104", "127.0.0.1:0"),
            r"proxy.yaml:4:19: error: .*port 0 is only allowed on a listener",
            id="upstream-port-0",
        ),
        pytest.param(
            MINIMAL.replace('"127.0.0.1:0"', '"::1:104"'),
            r"proxy.yaml:2:24: error: .*write IPv6 addresses in brackets",
            id="bare-ipv6",
        ),
        pytest.param(
            MINIMAL.replace('"127.0.0.1:0"', "[::1]:104"),
            r"proxy.yaml:2:2\d: error: invalid YAML: .*quote it",
            id="unquoted-ipv6-is-a-syntax-error-with-a-hint",
        ),
        pytest.param(
            MINIMAL + "routes: {PACS: pacz}\n",
            r"proxy.yaml:6:16: error: unknown upstream 'pacz' in the route for 'PACS' \(defined upstreams: 'pacs'\)",
            id="route-to-unknown-upstream",
        ),
        pytest.param(
            MINIMAL.replace("default_upstream: pacs", "default_upstream: nope"),
            r"proxy.yaml:5:19: error: unknown upstream 'nope' in 'default_upstream'",
            id="unknown-default-upstream",
        ),
        pytest.param(
            MINIMAL.replace("default_upstream: pacs\n", ""),
            r"proxy.yaml:1:1: error: the top level needs 'routes' or 'default_upstream'",
            id="nowhere-to-route",
        ),
        pytest.param(
            MINIMAL.replace("upstreams:\n  pacs: {address: \"127.0.0.1:104\"}\n", ""),
            r"proxy.yaml:1:1: error: missing required key 'upstreams' in the top level",
            id="missing-upstreams",
        ),
        pytest.param(
            MINIMAL.replace('  - {name: l, address: "127.0.0.1:0"}\n', "  []\n"),
            r"proxy.yaml:2:3: error: 'listeners' must not be an empty list",
            id="empty-listeners",
        ),
        pytest.param(
            MINIMAL + "routes: {}\n",
            r"proxy.yaml:6:9: error: 'routes' must not be empty",
            id="empty-routes",
        ),
        pytest.param(
            MINIMAL.replace("pacs: {address", "pacs: {tls: {ca: x.pem}, address"),
            r"proxy.yaml:4:20: error: 'ca' in 'tls' of upstream 'pacs': cannot read .*x.pem: No such file",
            id="missing-file",
        ),
        pytest.param(
            MINIMAL + "routes: {THIS_IS_SEVENTEEN_CH: pacs}\n",
            r"proxy.yaml:6:10: error: AE title 'THIS_IS_SEVENTEEN_CH' is longer than 16 characters",
            id="ae-too-long",
        ),
        pytest.param(
            MINIMAL + 'routes: {"   ": pacs}\n',
            r"proxy.yaml:6:10: error: an AE title must not be empty or all spaces",
            id="ae-all-spaces",
        ),
        pytest.param(
            MINIMAL + 'routes: {"A\\\\B": pacs}\n',
            r"proxy.yaml:6:10: error: AE title .* must not contain a backslash",
            id="ae-backslash",
        ),
        pytest.param(
            MINIMAL + 'routes: {"A\\tB": pacs}\n',
            r"proxy.yaml:6:10: error: AE title .* must not contain control characters",
            id="ae-control",
        ),
        pytest.param(
            MINIMAL + "routes: {104: pacs}\n",
            r"proxy.yaml:6:10: error: AE title '104' must be a string; quote it",
            id="ae-number",
        ),
        pytest.param(
            MINIMAL + 'routes: {PACS: pacs, "PACS ": pacs}\n',
            r"proxy.yaml:6:22: error: AE title 'PACS' is already routed at line 6",
            id="ae-duplicate-after-stripping",
        ),
        pytest.param(
            MINIMAL + "timeouts: {idle: 0}\n",
            r"proxy.yaml:6:18: error: timeout 'idle' \(seconds\) must be greater than 0, got 0",
            id="timeout-zero",
        ),
        pytest.param(
            MINIMAL + "timeouts: {connect: yes}\n",
            r"proxy.yaml:6:21: error: timeout 'connect' \(seconds\) must be a number, got a boolean",
            id="timeout-bool",
        ),
        pytest.param(
            MINIMAL + "timeouts: {artim: 30, linger: 3}\n",
            r"proxy.yaml:6:23: error: unknown key 'linger' in 'timeouts' \(expected one of: 'artim', 'connect', "
            r"'acse', 'idle', 'shutdown'\)",
            id="timeout-unknown",
        ),
        pytest.param(
            MINIMAL + "max_pdu_length: 0\n",
            r"proxy.yaml:6:17: error: 'max_pdu_length' must be between 4096 and 16777216, got 0",
            id="pdu-zero",
        ),
        pytest.param(
            MINIMAL + "max_associate_length: 16777217\n",
            r"proxy.yaml:6:23: error: 'max_associate_length' must be between 4096 and 16777216",
            id="assoc-too-big",
        ),
        pytest.param(
            MINIMAL + "max_pdu_length: 65536.0\n",
            r"proxy.yaml:6:17: error: 'max_pdu_length' must be an integer, got a number \(65536.0\)",
            id="pdu-float",
        ),
        pytest.param(
            MINIMAL.replace("- {name: l,", "- {name: l, extra: 1,"),
            r"proxy.yaml:2:15: error: unknown key 'extra' in a listener",
            id="unknown-listener-key",
        ),
        pytest.param(
            MINIMAL.replace("{name: l,", "{name: 'l l',"),
            r"proxy.yaml:2:12: error: listener name 'l l' must be",
            id="bad-listener-name",
        ),
        pytest.param(
            MINIMAL.replace('pacs: {address: "127.0.0.1:104"}', 'pacs: {address: "127.0.0.1:104", tls: }'),
            r"proxy.yaml:4:\d+: error: 'tls' of upstream 'pacs' is empty: use 'tls: {}'",
            id="tls-null",
        ),
        pytest.param(
            "- just\n- a list\n",
            r"proxy.yaml:1:1: error: the top level must be a mapping, got a list",
            id="top-not-mapping",
        ),
        pytest.param("", r"proxy.yaml:1:1: error: the file is empty", id="empty-file"),
        pytest.param(
            MINIMAL + "---\nmore: 1\n",
            r"proxy.yaml:6:1: error: invalid YAML: .*expected a single document",
            id="two-documents",
        ),
        pytest.param(
            MINIMAL + "timeouts:\n\tidle: 3\n",
            r"proxy.yaml:7:1: error: invalid YAML: .*found character '\\t'",
            id="tab-indent",
        ),
    ],
)
def test_each_mistake_is_reported_at_its_location(tmp_path: Path, text: str, expected: str) -> None:
    message = one_error(write(tmp_path, text))
    assert re.match(expected, message.replace(str(tmp_path) + "/", "")), message


def test_message_names_the_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, MINIMAL + "bogus: 1\n", name="site.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigErrors) as info:
        config.load("site.yaml")
    assert str(info.value).startswith("site.yaml:6:1: error: unknown key 'bogus'")


def test_all_errors_are_collected_in_one_pass_in_file_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        listeners:
          - name: a
            address: nowhere
          - name: a
            address: "127.0.0.1:0"
        upstreams:
          pacs:
            address: "127.0.0.1:104"
            tls: {ca: missing.pem, key: proxy.key}
          pacs:
            address: "127.0.0.1:105"
        routes:
          PACS: pacs
          CT: tape
        default_upstream: disk
        timeouts: {idle: -5}
        max_pdu_length: 1
        """,
    )
    rendered = [e.render() for e in errors_of(path)]
    p = str(path)
    assert rendered == [
        f"{p}:3:14: error: the address of listener 'a': 'nowhere': expected host:port, e.g. 127.0.0.1:11112",
        f"{p}:4:11: error: duplicate listener name 'a' (first used at line 2)",
        f"{p}:9:15: error: 'ca' in 'tls' of upstream 'pacs': cannot read {tmp_path}/missing.pem: "
        "No such file or directory",
        f"{p}:9:28: error: 'tls' of upstream 'pacs' has 'key' but no 'cert': a client certificate needs both",
        f"{p}:9:33: error: 'key' in 'tls' of upstream 'pacs': cannot read {tmp_path}/proxy.key: "
        "No such file or directory",
        f"{p}:10:3: error: duplicate key 'pacs' (first defined at line 7, column 3)",
        f"{p}:14:7: error: unknown upstream 'tape' in the route for 'CT' (defined upstreams: 'pacs')",
        f"{p}:15:19: error: unknown upstream 'disk' in 'default_upstream' (defined upstreams: 'pacs')",
        f"{p}:16:18: error: timeout 'idle' (seconds) must be greater than 0, got -5",
        f"{p}:17:17: error: 'max_pdu_length' must be between 4096 and 16777216, got 1",
    ]


def test_caret_points_at_the_offending_column(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "timeouts: {artim: 30, linger: 3}\n")
    (error,) = errors_of(path)
    head, line, caret = error.render(with_caret=True).split("\n")
    assert head.startswith(f"{path}:6:23: error: unknown key 'linger'")
    assert line == "    timeouts: {artim: 30, linger: 3}"
    assert caret == "    " + " " * 22 + "^"
    assert line[caret.index("^") :].startswith("linger")


def test_tls_files_are_checked_for_content(site: Path, pki: dict[str, Path]) -> None:
    (site / "junk.pem").write_text("not a certificate\n")
    path = write(
        site,
        """\
        listeners: [{name: l, address: "127.0.0.1:0"}]
        upstreams:
          a: {address: "h:1", tls: {ca: junk.pem}}
          b: {address: "h:2", tls: {cert: certs/proxy.pem, key: certs/archive.key}}
          c: {address: "h:3", tls: {cert: certs/proxy.pem, key: certs/proxy.key, ca: certs}}
        default_upstream: a
        """,
    )
    rendered = [e.render() for e in errors_of(path)]
    assert rendered == [
        f"{path}:3:33: error: {site}/junk.pem does not contain a PEM certificate",
        f"{path}:4:57: error: {site}/certs/archive.key is not the private key of {site}/certs/proxy.pem",
        f"{path}:5:78: error: 'ca' in 'tls' of upstream 'c': {site}/certs is a folder, expected a file",
    ]


def test_encrypted_key_is_refused_without_showing_it(site: Path, pki: dict[str, Path]) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki["proxy_key"].read_bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret-passphrase"),
    )
    (site / "enc.key").write_bytes(encrypted)
    path = write(
        site,
        """\
        listeners: [{name: l, address: "127.0.0.1:0"}]
        upstreams: {a: {address: "h:1", tls: {cert: certs/proxy.pem, key: enc.key}}}
        default_upstream: a
        """,
    )
    message = one_error(path)
    assert "enc.key is encrypted" in message
    assert "secret-passphrase" not in message and "BEGIN" not in message


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors) as info:
        config.load(tmp_path / "absent.yaml")
    assert "cannot read" in str(info.value) and "absent.yaml" in str(info.value)


def test_invalid_utf8_is_located(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_bytes(MINIMAL.encode() + b"routes: {\xff: pacs}\n")
    assert one_error(path).startswith(f"{path}:6:10: error: the file is not valid UTF-8")


# --------------------------------------------------------------------------- yamlsrc directly


def test_yamlsrc_nodes_carry_locations_and_values() -> None:
    errors: list[ConfigError] = []
    root = yamlsrc.parse("a: 1\nb:\n  - x\n  - 'y'\nc: {d: null, e: 2.5, f: true}\n", "f.yaml", errors)
    assert errors == []
    assert isinstance(root, yamlsrc.MapNode)
    assert [k.value for k, _ in root] == ["a", "b", "c"]
    a = root.get("a")
    assert isinstance(a, yamlsrc.ScalarNode) and a.value == 1 and str(a.loc) == "f.yaml:1:4"
    b = root.get("b")
    assert isinstance(b, yamlsrc.SeqNode) and len(b) == 2
    assert [(n.loc.line, n.loc.col) for n in b] == [(3, 5), (4, 5)]
    y = b.items[1]
    assert isinstance(y, yamlsrc.ScalarNode) and y.quoted and y.value == "y"
    c = root.get("c")
    assert isinstance(c, yamlsrc.MapNode)
    values = {k.value: v.value for k, v in c if isinstance(v, yamlsrc.ScalarNode)}
    assert values == {"d": None, "e": 2.5, "f": True}
    key = root.key_node("c")
    assert key is not None and (key.loc.line, key.loc.col) == (5, 1)
    assert "zzz" not in root and root.get("zzz") is None


def test_yamlsrc_keeps_first_duplicate_and_reports_each_later_one() -> None:
    errors: list[ConfigError] = []
    root = yamlsrc.parse("k: 1\nk: 2\nk: 3\n", "f.yaml", errors)
    assert isinstance(root, yamlsrc.MapNode)
    value = root.get("k")
    assert isinstance(value, yamlsrc.ScalarNode) and value.value == 1
    assert [e.render() for e in errors] == [
        "f.yaml:2:1: error: duplicate key 'k' (first defined at line 1, column 1)",
        "f.yaml:3:1: error: duplicate key 'k' (first defined at line 1, column 1)",
    ]


def test_yamlsrc_true_and_1_are_different_keys() -> None:
    errors: list[ConfigError] = []
    root = yamlsrc.parse("1: a\ntrue: b\n'1': c\n", "f.yaml", errors)
    assert errors == [] and isinstance(root, yamlsrc.MapNode) and len(root) == 3


def test_yamlsrc_aliases_are_built_once() -> None:
    # Nine levels of nine aliases: 387 million leaves if expanded, instant if shared.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    errors: list[ConfigError] = []
    root = yamlsrc.parse("\n".join(lines) + "\n", "f.yaml", errors)
    assert errors == [] and isinstance(root, yamlsrc.MapNode)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: &a [1, *a]\n", "f.yaml:1:4: error: an alias refers to the node that contains it"),
        ("b: &b {x: 1}\nc:\n  <<: *b\n", "f.yaml:3:3: error: merge keys ('<<') are not supported"),
        ("n: !!python/int 5000\n", "f.yaml:1:4: error: could not determine a constructor"),
        ("n: !custom 5\n", "f.yaml:1:4: error: could not determine a constructor"),
        ("s: !!set {a, b}\n", "f.yaml:1:4: error: unsupported tag 'tag:yaml.org,2002:set' on a mapping"),
        ("[a]: 1\n", "f.yaml:1:1: error: a mapping key must be a plain value, not a list"),
    ],
)
def test_yamlsrc_refuses_what_hides_a_value(text: str, expected: str) -> None:
    errors: list[ConfigError] = []
    yamlsrc.parse(text, "f.yaml", errors)
    assert errors and errors[0].render().startswith(expected), [e.render() for e in errors]


def test_yamlsrc_load_file_raises_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("a: [1, 2\n")
    with pytest.raises(ConfigErrors) as info:
        yamlsrc.load_file(path)
    (error,) = info.value.errors
    assert error.location is not None and error.location.path == str(path)
    assert error.render().startswith(f"{path}:2:1: error: invalid YAML: while parsing a flow sequence")


def test_collector_helpers() -> None:
    errors: list[ConfigError] = []
    root = yamlsrc.parse("n: 5\ns: ''\nm: {}\n", "f.yaml", errors)
    assert isinstance(root, yamlsrc.MapNode)
    check = yamlsrc.Collector()
    n, s, m = root.get("n"), root.get("s"), root.get("m")
    assert n is not None and s is not None and m is not None
    assert check.integer(n, "'n'", low=1, high=10) == 5
    assert check.integer(n, "'n'", high=4) is None
    assert check.string(s, "'s'") is None
    assert check.string(s, "'s'", nonempty=False) == ""
    assert check.sequence(m, "'m'") is None
    assert check.number(n, "'n'", positive=True) == 5.0
    assert [e.message for e in check.errors] == [
        "'n' must be at most 4, got 5",
        "'s' must not be empty",
        "'m' must be a list, got a mapping",
    ]
    with pytest.raises(ConfigErrors):
        check.raise_if_any()


# --------------------------------------------------------------------------- TLS listeners and upstream TLS extras

TLS_SITE = """\
listeners:
  - name: modalities
    address: "127.0.0.1:0"
    tls:
      cert: certs/proxy.pem
      key: certs/proxy.key
      client_ca: certs/ca.pem
      profile: bcp195-ex
      bind_ae:
        MODALITY01: [CT01, "CT01B "]
        ct02.Ward.Example: CT02
        "2001:DB8::0:7": [US01]
  - name: server-only
    address: "127.0.0.1:0"
    tls: {cert: certs/proxy.pem, key: certs/proxy.key}
  - name: optional
    address: "127.0.0.1:0"
    tls: {cert: certs/proxy.pem, key: certs/proxy.key, client_ca: certs/ca.pem, require_client_cert: false}
  - {name: plain, address: "127.0.0.1:0"}
upstreams:
  pacs:
    address: 127.0.0.1:2762
    tls:
      ca: certs/ca.pem
      profile: tls13-only
      pin_sha256:
        - cert:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89
        - spki:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
  legacy:
    address: 127.0.0.1:2763
    tls:
      insecure_skip_verify: true
      pin_sha256: "spki:0000000000000000000000000000000000000000000000000000000000000000"
  wild:
    address: 127.0.0.1:2764
    tls: {insecure_skip_verify: true}
default_upstream: pacs
"""


def test_tls_listeners_and_upstream_extras_load(site: Path) -> None:
    cfg = config.load(write(site, TLS_SITE))
    mtls, server_only, optional, plain = cfg.listeners
    assert mtls.tls == config.ListenerTLS(
        cert=site / "certs/proxy.pem",
        key=site / "certs/proxy.key",
        client_ca=site / "certs/ca.pem",
        require_client_cert=True,  # the default once client_ca is given
        profile="bcp195-ex",
        bind_ae=mtls.tls.bind_ae if mtls.tls else {},
    )
    assert mtls.tls is not None and dict(mtls.tls.bind_ae) == {
        "modality01": frozenset({"CT01", "CT01B"}),  # compared without case; AE padding stripped
        "ct02.ward.example": frozenset({"CT02"}),  # one AE title may be written without a list
        "2001:db8::7": frozenset({"US01"}),  # IP addresses in canonical form
    }
    assert server_only.tls == config.ListenerTLS(cert=site / "certs/proxy.pem", key=site / "certs/proxy.key")
    assert server_only.tls.profile == "bcp195-nd" and not server_only.tls.require_client_cert
    assert optional.tls is not None and optional.tls.client_ca is not None and not optional.tls.require_client_cert
    assert plain.tls is None

    pacs = cfg.upstreams["pacs"].tls
    assert pacs is not None and pacs.profile == "tls13-only" and not pacs.insecure_skip_verify
    assert pacs.pin_sha256 == (
        config.CertPin("cert", "abcdef0123456789" * 4),
        config.CertPin("spki", "0123456789abcdef" * 4),
    )
    legacy, wild = cfg.upstreams["legacy"].tls, cfg.upstreams["wild"].tls
    assert legacy is not None and legacy.insecure_skip_verify and legacy.pin_sha256 == (
        config.CertPin("spki", "0" * 64),
    )
    assert wild is not None and wild.insecure_skip_verify and wild.pin_sha256 == ()
    path = site / "proxy.yaml"
    assert cfg.warnings == (
        f"{path}:32:29: warning: upstream 'legacy': insecure_skip_verify is on: its certificate chain and host "
        "name are NOT verified; only the pinned 'pin_sha256' is checked",
        f"{path}:36:33: warning: upstream 'wild': insecure_skip_verify is on: its certificate chain and host "
        "name are NOT verified; anyone on the network path can impersonate it",
    )


def test_existing_configs_keep_their_meaning(site: Path) -> None:
    cfg = config.load(write(site, EXAMPLE))
    tls = cfg.upstreams["pacs"].tls
    assert tls is not None
    assert (tls.profile, tls.pin_sha256) == ("bcp195-nd", ())
    assert (tls.insecure_skip_verify, tls.passphrase_file) == (False, None)
    assert cfg.listeners[0].tls is None and cfg.warnings == ()


TLS_MINIMAL = """\
listeners:
  - name: l
    address: "127.0.0.1:0"
    tls: {cert: certs/proxy.pem, key: certs/proxy.key, LISTENER}
upstreams:
  pacs: {address: "127.0.0.1:104", tls: {ca: certs/ca.pem, UPSTREAM}}
default_upstream: pacs
"""


def tls_config(listener: str = "", upstream: str = "") -> str:
    return TLS_MINIMAL.replace(", LISTENER", f", {listener}" if listener else "").replace(
        ", UPSTREAM", f", {upstream}" if upstream else ""
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            tls_config().replace("tls: {cert: certs/proxy.pem, key: certs/proxy.key}", "tls:"),
            r"proxy.yaml:4:\d+: error: 'tls' of listener 'l' is empty: a TLS listener needs at least 'cert' and 'key'",
            id="listener-tls-null",
        ),
        pytest.param(
            tls_config().replace(", key: certs/proxy.key", ""),
            r"proxy.yaml:4:10: error: missing required key 'key' in 'tls' of listener 'l'",
            id="listener-tls-no-key",
        ),
        pytest.param(
            tls_config("ca: certs/ca.pem"),
            r"proxy.yaml:4:56: error: unknown key 'ca' in 'tls' of listener 'l' \(expected one of: 'cert', 'key', "
            r"'client_ca', 'require_client_cert', 'profile', 'bind_ae', 'passphrase_file'\)",
            id="listener-ca-instead-of-client_ca",
        ),
        pytest.param(
            tls_config("require_client_cert: true"),
            r"proxy.yaml:4:77: error: 'require_client_cert' in 'tls' of listener 'l' needs 'client_ca'",
            id="require-without-client-ca",
        ),
        pytest.param(
            tls_config("client_ca: certs/ca.pem, require_client_cert: yes"),
            r"proxy.yaml:4:\d+: error: 'require_client_cert' in 'tls' of listener 'l' must be true or false, "
            r"got a boolean \(yes\)",
            id="yaml11-yes",
        ),
        pytest.param(
            tls_config("bind_ae: {MODALITY01: CT01}"),
            r"proxy.yaml:4:56: error: 'bind_ae' in 'tls' of listener 'l' needs 'client_ca': only verified",
            id="bind-without-client-ca",
        ),
        pytest.param(
            tls_config("client_ca: certs/ca.pem, bind_ae: {}"),
            r"proxy.yaml:4:\d+: error: 'bind_ae' in 'tls' of listener 'l' must not be empty",
            id="bind-empty",
        ),
        pytest.param(
            tls_config("client_ca: certs/ca.pem, bind_ae: {MODALITY01: [CT01], modality01: [CT02]}"),
            r"proxy.yaml:4:\d+: error: certificate name 'modality01' is already bound at line 4 "
            r"\(names are compared without regard to case\)",
            id="bind-duplicate-ignoring-case",
        ),
        pytest.param(
            tls_config("client_ca: certs/ca.pem, bind_ae: {MODALITY01: [THIS_AE_TITLE_IS_TOO_LONG]}"),
            r"proxy.yaml:4:\d+: error: AE title 'THIS_AE_TITLE_IS_TOO_LONG' is longer than 16 characters",
            id="bind-bad-ae",
        ),
        pytest.param(
            tls_config("client_ca: certs/ca.pem, bind_ae: {MODALITY01: []}"),
            r"proxy.yaml:4:\d+: error: the AE titles of 'MODALITY01' in 'bind_ae' in 'tls' of listener 'l' must "
            r"not be an empty list",
            id="bind-no-titles",
        ),
        pytest.param(
            tls_config("client_ca: certs/ca.pem, bind_ae: {1234: [CT01]}"),
            r"proxy.yaml:4:\d+: error: a certificate name in 'bind_ae' in 'tls' of listener 'l' must be a "
            r"non-empty string",
            id="bind-int-key",
        ),
        pytest.param(
            tls_config("profile: bcp195-extended"),
            r"proxy.yaml:4:\d+: error: unknown TLS profile 'bcp195-extended' in 'tls' of listener 'l' "
            r"\(expected one of: 'bcp195-nd', 'bcp195', 'bcp195-ex', 'tls13-only'\)",
            id="listener-bad-profile",
        ),
        pytest.param(
            tls_config(upstream="profile: TLS1.2"),
            r"proxy.yaml:6:\d+: error: unknown TLS profile 'TLS1.2' in 'tls' of upstream 'pacs'",
            id="upstream-bad-profile",
        ),
        pytest.param(
            tls_config(upstream="pin_sha256: abcdef"),
            r"proxy.yaml:6:\d+: error: 'pin_sha256' in 'tls' of upstream 'pacs': 'abcdef': write "
            r"'cert:<sha256 hex>' \(the certificate\) or 'spki:<sha256 hex>' \(its public key\)",
            id="pin-without-kind",
        ),
        pytest.param(
            tls_config(upstream="pin_sha256: [spki:abcd]"),
            r"proxy.yaml:6:\d+: error: 'pin_sha256' in 'tls' of upstream 'pacs': 'spki:abcd': expected 64 "
            r"hexadecimal digits \(a SHA-256\) after 'spki:', got 4 characters",
            id="pin-short",
        ),
        pytest.param(
            tls_config(upstream="pin_sha256: []"),
            r"proxy.yaml:6:\d+: error: 'pin_sha256' in 'tls' of upstream 'pacs' must not be an empty list",
            id="pin-empty-list",
        ),
        pytest.param(
            tls_config(upstream="insecure_skip_verify: 'true'"),
            r"proxy.yaml:6:\d+: error: 'insecure_skip_verify' in 'tls' of upstream 'pacs' must be true or false, "
            r"got a string",
            id="insecure-quoted",
        ),
        pytest.param(
            tls_config(upstream="passphrase_file: certs/ca.pem"),
            r"proxy.yaml:6:\d+: error: 'tls' of upstream 'pacs' has 'passphrase_file' but no 'key' to decrypt",
            id="passphrase-without-key",
        ),
    ],
)
def test_each_tls_mistake_is_reported_at_its_location(site: Path, text: str, expected: str) -> None:
    message = one_error(write(site, text))
    assert re.match(expected, message.replace(str(site) + "/", "")), message


def _encrypted_key(site: Path, pki: dict[str, Path], passphrase: bytes) -> Path:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki["proxy_key"].read_bytes(), password=None)
    path = site / "enc.key"
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    ))  # fmt: skip
    return path


def test_passphrase_file_for_encrypted_keys(site: Path, pki: dict[str, Path]) -> None:
    _encrypted_key(site, pki, b"open sesame")
    good = site / "good.pass"
    good.write_bytes(b"open sesame\n")
    good.chmod(0o600)
    text = """\
        listeners:
          - name: l
            address: "127.0.0.1:0"
            tls: {cert: certs/proxy.pem, key: enc.key, passphrase_file: PASS}
        upstreams:
          pacs: {address: "127.0.0.1:104", tls: {cert: certs/proxy.pem, key: enc.key, passphrase_file: PASS}}
        default_upstream: pacs
        """
    cfg = config.load(write(site, text.replace("PASS", "good.pass")))
    listener_tls, upstream_tls = cfg.listeners[0].tls, cfg.upstreams["pacs"].tls
    assert listener_tls is not None and listener_tls.passphrase_file == good
    assert upstream_tls is not None and upstream_tls.passphrase_file == good
    assert cfg.warnings == ()

    good.chmod(0o644)
    cfg = config.load(write(site, text.replace("PASS", "good.pass")))
    assert len(cfg.warnings) == 2 and all("good.pass is readable by other users" in w for w in cfg.warnings)

    wrong = site / "wrong.pass"
    wrong.write_bytes(b"let me in\n")
    rendered = [e.render() for e in errors_of(write(site, text.replace("PASS", "wrong.pass")))]
    assert rendered == [
        f"{site}/proxy.yaml:4:39: error: cannot decrypt {site}/enc.key with the passphrase in {wrong} "
        "(wrong passphrase?)",
        f"{site}/proxy.yaml:6:70: error: cannot decrypt {site}/enc.key with the passphrase in {wrong} "
        "(wrong passphrase?)",
    ]
    assert not any("let me in" in r or "open sesame" in r for r in rendered)

    (site / "empty.pass").write_bytes(b"\n")
    message = errors_of(write(site, text.replace("PASS", "empty.pass")))[0].render()
    assert message.endswith(f"error: cannot use the passphrase file {site}/empty.pass: {site}/empty.pass is empty")

    plain = text.replace("enc.key", "certs/proxy.key").replace("PASS", "good.pass")
    assert errors_of(write(site, plain))[0].render().endswith(
        f"error: {site}/certs/proxy.key is not encrypted; remove 'passphrase_file'"
    )
