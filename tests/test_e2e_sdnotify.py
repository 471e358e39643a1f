"""The running proxy tells systemd READY, RELOADING then READY on SIGHUP, and STOPPING on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from pathlib import Path

from tests.conftest import LISTENING, REPO_ROOT
from tests.peers import Peer, free_port, wait_for_line


def test_notify_messages_in_order(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(15)
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"listeners:\n  - {{name: m, address: 127.0.0.1:{free_port()}}}\n"
        "upstreams:\n  pacs: {address: 127.0.0.1:9}\ndefault_upstream: pacs\n"
    )
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
    proxy = Peer("proxy", [sys.executable, "-m", "proxy", "run", "-c", str(config)], tmp_path / "proxy.log",
                 env=env, cwd=REPO_ROOT)
    try:
        proxy.start()
        wait_for_line(proxy, LISTENING, 15)

        def next_state() -> str:
            while True:
                message = sock.recv(4096).decode()
                if message != "WATCHDOG=1":
                    return message

        assert next_state().startswith("READY=1")
        assert sock.recv(4096).decode() == "WATCHDOG=1"  # pings every WATCHDOG_USEC/2
        proxy.signal(signal.SIGHUP)
        reloading = next_state()
        assert reloading.startswith("RELOADING=1")
        assert re.search(r"^MONOTONIC_USEC=\d+$", reloading, re.M)
        assert next_state().startswith("READY=1")
        proxy.signal(signal.SIGTERM)
        assert next_state().startswith("STOPPING=1")
        assert proxy.wait(15) == 0
    finally:
        proxy.stop()
        sock.close()
