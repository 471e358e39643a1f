"""proxy.yaml: `metrics:`, `devices:`, per-upstream `health:` and failover lists in `routes:` /
`default_upstream:`; every mistake reported where it is."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from proxy import config
from proxy.config import Address, BasicAuth, ConfigErrors, HealthCheck, MetricsConfig, MetricsTLS

BASE = """\
listeners: [{name: l, address: "127.0.0.1:0"}]
upstreams:
  pacs: {address: "127.0.0.1:2762"}
  pacs-dr: {address: "127.0.0.1:2763"}
"""


def load(text: str, folder: Path) -> config.ProxyConfig:
    path = folder / "proxy.yaml"
    path.write_text(textwrap.dedent(text))
    return config.load(path)


def one_error(text: str, folder: Path) -> str:
    with pytest.raises(ConfigErrors) as info:
        load(text, folder)
    errors = info.value.errors
    assert len(errors) == 1, [e.render() for e in errors]
    return errors[0].render().replace(str(folder) + "/", "")


def test_failover_lists_keep_the_single_name_form(tmp_path: Path) -> None:
    cfg = load(BASE + "routes: {PACS: [pacs, pacs-dr], CT: pacs-dr}\ndefault_upstream: [pacs-dr, pacs]\n", tmp_path)
    assert dict(cfg.routes) == {"PACS": "pacs", "CT": "pacs-dr"}  # the contract: first name, a str
    assert dict(cfg.route_upstreams) == {"PACS": ("pacs", "pacs-dr"), "CT": ("pacs-dr",)}
    assert cfg.default_upstream == "pacs-dr"
    assert cfg.default_upstreams == ("pacs-dr", "pacs")
    assert cfg.upstream_names_for("PACS  ") == ("pacs", "pacs-dr")
    assert cfg.upstream_names_for("ELSE") == ("pacs-dr", "pacs")
    assert cfg.upstream_for("PACS") is cfg.upstreams["pacs"]
    single = load(BASE + "default_upstream: pacs\n", tmp_path)
    assert single.default_upstreams == ("pacs",) and single.route_upstreams == {}
    assert single.upstream_names_for("X") == ("pacs",)
    assert single.metrics is None and dict(single.devices) == {}
    assert single.upstreams["pacs"].health is None


def test_metrics_devices_and_health(tmp_path: Path, dev_pki: dict[str, Path]) -> None:
    (tmp_path / "pw").write_text("secret\n")
    (tmp_path / "pw").chmod(0o600)
    cfg = load(f"""\
        listeners: [{{name: l, address: "127.0.0.1:0"}}]
        upstreams:
          pacs:
            address: "127.0.0.1:2762"
            health: {{called_ae: ARCHIVE, calling_ae: PROBE, interval: 2.5, timeout: 1, rise: 1, fall: 5}}
          other-pacs:
            address: "127.0.0.1:2763"
            health: {{called_ae: " ARCH2 "}}
        default_upstream: pacs
        metrics:
          address: "[::1]:9750"
          tls: {{cert: {dev_pki['proxy']}, key: {dev_pki['proxy_key']}}}
          basic_auth: {{username: prometheus, password_file: pw}}
        devices:
          ct-scanners: ["CT*", "SCANNER[0-9]"]
          mr: MR01
        """, tmp_path)
    assert cfg.upstreams["pacs"].health == HealthCheck("ARCHIVE", "PROBE", 2.5, 1.0, 1, 5)
    assert cfg.upstreams["other-pacs"].health == HealthCheck("ARCH2")
    assert cfg.metrics == MetricsConfig(
        Address("::1", 9750),
        MetricsTLS(dev_pki["proxy"], dev_pki["proxy_key"]),
        BasicAuth("prometheus", tmp_path / "pw"),
    )
    assert dict(cfg.devices) == {"ct-scanners": ("CT*", "SCANNER[0-9]"), "mr": ("MR01",)}
    assert list(cfg.devices) == ["ct-scanners", "mr"]  # file order: the first listed device wins
    assert not cfg.warnings


@pytest.fixture(scope="module")
def dev_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from proxy import certs

    return certs.init(tmp_path_factory.mktemp("pki"))


def test_a_world_readable_password_file_is_a_warning(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("secret")
    (tmp_path / "pw").chmod(0o644)
    cfg = load(BASE + 'default_upstream: pacs\n'
                      'metrics: {address: "127.0.0.1:0", basic_auth: {username: p, password_file: pw}}\n', tmp_path)
    assert any("chmod 600" in w for w in cfg.warnings)
    assert any("clear text" in w for w in cfg.warnings)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "default_upstream: [pacs, nope]\n",
            r"proxy.yaml:5:26: error: unknown upstream 'nope' in 'default_upstream'",
            id="unknown-in-list",
        ),
        pytest.param(
            "routes: {PACS: [pacs, pacs]}\ndefault_upstream: pacs\n",
            r"proxy.yaml:5:23: error: upstream 'pacs' is listed twice in the route for 'PACS'",
            id="listed-twice",
        ),
        pytest.param("routes: {PACS: []}\n", r"proxy.yaml:5:16: error: the route for 'PACS' must not be an empty list",
                     id="empty-list"),
        pytest.param(
            "default_upstream: pacs\nmetrics: {address: 9750}\n",
            r"proxy.yaml:6:20: error: the address of 'metrics' must be a string 'host:port'",
            id="metrics-address",
        ),
        pytest.param(
            "default_upstream: pacs\nmetrics: {address: \"127.0.0.1:9750\", tsl: {}}\n",
            r"proxy.yaml:6:38: error: unknown key 'tsl' in 'metrics' \(expected one of: 'address', 'tls', "
            r"'basic_auth'\)",
            id="metrics-typo",
        ),
        pytest.param(
            "default_upstream: pacs\nmetrics: {address: \"127.0.0.1:9750\", tls: {cert: nope.pem, key: proxy.yaml}}\n",
            r"proxy.yaml:6:50: error: 'cert' in 'tls' of 'metrics': cannot read .*nope.pem",
            id="metrics-tls-missing",
        ),
        pytest.param(
            "default_upstream: pacs\nmetrics: {address: \"127.0.0.1:9750\", basic_auth: {username: p}}\n",
            r"proxy.yaml:6:50: error: missing required key 'password_file' in 'basic_auth' of 'metrics'",
            id="basic-auth-no-password",
        ),
        pytest.param(
            "default_upstream: pacs\nmetrics: {address: \"127.0.0.1:9750\", "
            "basic_auth: {username: \"a:b\", password_file: proxy.yaml}}\n",
            r"proxy.yaml:6:61: error: 'username' in 'basic_auth' of 'metrics' must be printable and must not "
            r"contain ':'",
            id="basic-auth-colon",
        ),
        pytest.param(
            "default_upstream: pacs\ndevices: {other: [X*]}\n",
            r"proxy.yaml:6:11: error: device name 'other' is reserved",
            id="device-other",
        ),
        pytest.param(
            "default_upstream: pacs\ndevices: {ct: [CT*], ct2: [\"CT*\"]}\n",
            r"proxy.yaml:6:28: error: pattern 'CT\*' is already used by device 'ct'",
            id="device-duplicate-pattern",
        ),
        pytest.param(
            "default_upstream: pacs\ndevices: {ct: [\"CT[1\"]}\n",
            r"proxy.yaml:6:16: error: the AE title patterns of device 'ct': unclosed '\['",
            id="device-bad-glob",
        ),
        pytest.param(
            "default_upstream: pacs\ndevices: {ct: [THIS_IS_LONGER_THAN_16]}\n",
            r"proxy.yaml:6:16: error: AE title 'THIS_IS_LONGER_THAN_16' is longer than 16 characters",
            id="device-long",
        ),
        pytest.param("default_upstream: pacs\ndevices: {}\n", r"proxy.yaml:6:10: error: 'devices' must not be empty",
                     id="devices-empty"),
        pytest.param(
            "default_upstream: pacs\ndevices: {\"bad name\": [X]}\n",
            r"proxy.yaml:6:11: error: device name 'bad name' must be 1-64 letters",
            id="device-name",
        ),
    ],
)
def test_each_mistake_is_reported_at_its_location(tmp_path: Path, text: str, expected: str) -> None:
    message = one_error(BASE + text, tmp_path)
    assert re.match(expected, message), message


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        ("{}", r"proxy.yaml:3:45: error: missing required key 'called_ae' in 'health' of upstream 'pacs'"),
        ("{called_ae: A, intervall: 3}", r"proxy.yaml:3:60: error: unknown key 'intervall'"),
        ("{called_ae: A, rise: 0}", r"proxy.yaml:3:66: error: 'rise' in 'health' of upstream 'pacs' must be "),
        ("{called_ae: A, fall: 1.5}", r"proxy.yaml:3:66: error: 'fall' in 'health' of upstream 'pacs' must be an "
                                      r"integer"),
        ("{called_ae: A, interval: 0}",
         r"proxy.yaml:3:70: error: 'interval' in 'health' of upstream 'pacs' \(seconds\) must be greater than 0"),
        ("{called_ae: \"A\\\\B\"}", r"proxy.yaml:3:57: error: AE title 'A\\\\B' must not contain a backslash"),
        ("{called_ae: [A]}", r"proxy.yaml:3:57: error: 'called_ae' in 'health' of upstream 'pacs' must be an AE title"),
        ("yes", r"proxy.yaml:3:45: error: 'health' of upstream 'pacs' must be a mapping"),
    ],
)
def test_health_mistakes(tmp_path: Path, health: str, expected: str) -> None:
    text = BASE.replace('pacs: {address: "127.0.0.1:2762"}', f'pacs: {{address: "127.0.0.1:2762", health: {health}}}')
    message = one_error(text + "default_upstream: pacs\n", tmp_path)
    assert re.match(expected, message), message
