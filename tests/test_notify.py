"""sd_notify: path and abstract addresses, no-op without NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pocketd.daemon import notify


def test_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        assert notify.notify("READY=1", "STATUS=waiting: not\ncharging", environ={"NOTIFY_SOCKET": str(path)})
        assert srv.recv(4096) == b"READY=1\nSTATUS=waiting: not\ncharging"


def test_abstract_socket(monkeypatch) -> None:
    name = f"pocketd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready("waiting:\nnot charging")
        assert srv.recv(4096) == b"READY=1\nSTATUS=waiting: not charging"
        assert notify.stopping()
        assert srv.recv(4096) == b"STOPPING=1"


def test_no_socket_is_a_no_op(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False
    assert notify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False  # logged only
    assert notify.notify("READY=1", environ={"NOTIFY_SOCKET": "relative"}) is False
