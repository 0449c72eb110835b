"""Zero egress: pocketd works with every non-Unix socket blocked, and never needs or enables hub access.

The blocker is a `sitecustomize.py` put first on PYTHONPATH, so it is loaded by every Python
process of the run, the daemon's trainer child included: any socket whose family is not
AF_UNIX, `create_connection`, `create_server` and every name lookup raise, and each attempt
is written (with its stack) to a log that must stay empty. A positive control shows the
blocker catches real attempts (raw sockets, urllib, huggingface_hub's download). The
HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE variables are removed from the environment of the run:
the code must not need them. A source scan checks that nothing under daemon/ ingest/
trainer/ store/ fetches URLs, calls the hub, opens a TCP/UDP socket or turns hub access on.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_helpers import wait_until_training

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("daemon", "ingest", "trainer", "store")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")

BLOCKER = r'''
"""Written by tests/test_zero_egress.py: no network for this process (only AF_UNIX sockets)."""
import _socket
import errno
import os
import socket
import sys
import traceback

_LOG = os.environ.get("EGRESS_TEST_LOG")
_LOADED = os.environ.get("EGRESS_TEST_LOADED")


def _argv():
    return " ".join(getattr(sys, "orig_argv", None) or sys.argv or ["?"]).replace("\n", " ")[:300]


def _append(path, text):
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")


_append(_LOADED, f"{os.getpid()}\t{_argv()}")


def _blocked(what):
    stack = "".join(traceback.format_stack()[:-2][-12:])
    _append(_LOG, f"--- pid {os.getpid()} ({_argv()}): {what}\n{stack}")
    return PermissionError(errno.EACCES, f"network blocked by the zero-egress test: {what}")


class GuardedSocket(socket.socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None and (socket.AF_INET if family == -1 else family) != socket.AF_UNIX:
            raise _blocked(f"socket(family={family!r}, type={type!r})")
        super().__init__(family, type, proto, fileno)
        if self.family != socket.AF_UNIX:  # an inherited or adopted non-Unix descriptor
            self.detach()
            raise _blocked(f"socket(fileno={fileno!r}, family={self.family!r})")


def _refuse(name):
    def refuse(*args, **kwargs):
        raise _blocked(f"{name}{args!r}")
    return refuse


socket.socket = GuardedSocket  # not _socket.socket: socket.socket.__init__ calls that one
for _name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
              "gethostbyaddr", "getnameinfo"):
    setattr(socket, _name, _refuse(_name))
    if hasattr(_socket, _name):
        setattr(_socket, _name, _refuse(_name))
'''


# -- the blocker -------------------------------------------------------------------------------------------


@pytest.fixture
def blocked_env(tmp_path: Path) -> dict[str, str]:
    """os.environ (the private home of conftest) + the blocker, without any *_OFFLINE variable."""
    site = tmp_path / "egress-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    env.update(PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
               EGRESS_TEST_LOG=str(tmp_path / "egress-attempts.log"),
               EGRESS_TEST_LOADED=str(tmp_path / "egress-loaded.log"),
               PYTHONDONTWRITEBYTECODE="1")
    return env


def attempts(env: dict[str, str]) -> str:
    path = Path(env["EGRESS_TEST_LOG"])
    return path.read_text() if path.exists() else ""


def loaded_by(env: dict[str, str]) -> list[str]:
    path = Path(env["EGRESS_TEST_LOADED"])
    return [line.split("\t", 1)[1] for line in path.read_text().splitlines()] if path.exists() else []


PROBE = r'''
import json, socket, sys, urllib.request
results = {}
def attempt(name, fn):
    try:
        fn()
        results[name] = "succeeded"
    except PermissionError as e:
        results[name] = "blocked" if "zero-egress" in str(e) else f"PermissionError: {e}"
    except Exception as e:  # wrapped by a library: blocked if the cause chain says so
        cause, text = e, ""
        while cause is not None:
            text += f" {type(cause).__name__}: {cause}"
            cause = cause.__cause__ or cause.__context__
        results[name] = "blocked" if "zero-egress" in text else f"other: {text[:300]}"
attempt("inet socket", lambda: socket.socket())
attempt("inet6 udp socket", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
attempt("create_connection", lambda: socket.create_connection(("127.0.0.1", 9), timeout=1))
attempt("getaddrinfo", lambda: socket.getaddrinfo("localhost", 80))
attempt("urllib", lambda: urllib.request.urlopen("http://127.0.0.1:9/", timeout=1))
def hub():  # what a model download starts with (hf_hub_download would retry for ~20 s)
    from huggingface_hub import HfApi
    HfApi().model_info("HuggingFaceTB/SmolLM2-135M-Instruct")
attempt("huggingface_hub", hub)
def unix():
    a, b = socket.socketpair()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    a.sendall(b"x"); assert b.recv(1) == b"x"
    for x in (a, b, s): x.close()
attempt("unix sockets", unix)
print(json.dumps(results))
'''


def test_the_blocker_blocks_real_attempts_and_allows_unix_sockets(blocked_env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], env=blocked_env, capture_output=True, text=True,
                         timeout=120, check=True)
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results.pop("unix sockets") == "succeeded"
    assert results == {k: "blocked" for k in results} and len(results) == 6, results
    log = attempts(blocked_env)
    for what in ("socket(family=", "create_connection", "getaddrinfo", "huggingface.co"):
        assert what in log
    assert len(loaded_by(blocked_env)) == 1


# -- the whole flow, blocked --------------------------------------------------------------------------------


def pocketd(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "pocketd.daemon", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"pocketd {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def flow_env(env: dict[str, str], tmp_path: Path, model: Path) -> dict[str, str]:
    power = tmp_path / "power.json"
    power.write_text(json.dumps({"on_power": True, "percent": 90}))
    return {**env,
            "POCKETD_TRAINER__MODEL": str(model), "POCKETD_TRAINER__THREADS": "1",
            "POCKETD_TRAINER__BATCH_SIZE": "2", "POCKETD_TRAINER__MICRO_BATCH_SIZE": "2",
            "POCKETD_TRAINER__SEQ_LEN": "32", "POCKETD_TRAINER__EVAL_EXAMPLES": "4",
            "POCKETD_DAEMON__POWER_PROBE": "fake", "POCKETD_DAEMON__FAKE_POWER_FILE": str(power),
            "POCKETD_POLICY__MAX_LOAD": "1000", "POCKETD_POLICY__MIN_AVAILABLE_MB": "0",
            "POCKETD_POLICY__MIN_BATTERY_PERCENT": "0", "POCKETD_POLICY__COOLDOWN_MINUTES": "0",
            "POCKETD_POLICY__CHECK_INTERVAL_S": "1"}


def write_notes(folder: Path, n: int = 12) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"note-{i:02d}.md").write_text(
            f"# Note {i}\n\nOn day {i} I repotted the basil, fixed the bike's rear brake and wrote down "
            f"{i * 7} ideas for the garden. The tomatoes in bed {i % 3} need more water.\n")
    return folder


def test_ingest_train_eval_run_status_with_the_network_blocked(
    tmp_path: Path, blocked_env: dict[str, str], tiny_model_dir: Path,
) -> None:
    env = flow_env(blocked_env, tmp_path, tiny_model_dir)
    notes = write_notes(tmp_path / "notes")

    pocketd(env, "ingest", str(notes))
    trained = pocketd(env, "train", "--steps", "3")
    assert "3 steps" in trained.stdout, trained.stdout
    ev = json.loads(pocketd(env, "eval", "--json").stdout)
    assert ev, ev

    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "pocketd.daemon", "run"], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    sock = tmp_path / "run" / "pocketd" / "pocketd.sock"
    try:
        wait_until_training(daemon, sock, log_path, fail_on_failed_session=True)  # the trainer is blocked too
        shown = json.loads(pocketd(env, "status", "--json").stdout)  # the CLI client, blocked too
        assert shown["ok"] and shown["state"] == "training"
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(120)
    assert code == 0, log_path.read_text()[-3000:]

    assert attempts(env) == "", "network attempts:\n" + attempts(env)
    argv = loaded_by(env)
    for needle in (" ingest ", " train ", " eval ", " run", " status ", "-m pocketd.trainer --job"):
        assert any(needle in a + " " for a in argv), (needle, argv)  # every process ran with the blocker
    assert not any(k in env for k in OFFLINE_VARS)


def test_the_trainer_turns_hub_access_off_itself(blocked_env: dict[str, str], tiny_model_dir: Path) -> None:
    code = (
        "import os, sys\n"
        "from trainer.model import load_base\n"
        "import huggingface_hub.constants as c\n"
        "base = load_base(sys.argv[1], cache_dir=sys.argv[2])\n"
        "print(os.environ.get('HF_HUB_OFFLINE'), c.HF_HUB_OFFLINE)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir), str(Path(blocked_env["HOME"]) / "cache")],
                         env=blocked_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "True"], out.stdout
    assert attempts(blocked_env) == ""


# -- the source ----------------------------------------------------------------------------------------------


NETWORK_MODULES = {"urllib.request", "urllib3", "http.client", "http.server", "requests", "httpx", "aiohttp",
                   "socketserver", "ftplib", "smtplib", "poplib", "imaplib", "telnetlib", "xmlrpc.client",
                   "xmlrpc.server", "websocket", "websockets", "huggingface_hub", "ssl"}
HUB_CALLS = {"hf_hub_download", "snapshot_download", "cached_download", "hf_hub_url", "HfApi", "urlopen",
             "create_connection", "create_server", "AF_INET", "AF_INET6", "getaddrinfo"}
URL = re.compile(r"\b(?:https?|ftp|wss?)://", re.I)


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 40
    return files


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def scan(paths: list[Path]) -> tuple[list[str], int]:
    """Network-ish constructs in `paths`, and how many from_pretrained calls were seen."""
    problems: list[str] = []
    from_pretrained = 0
    for path in paths:
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        tree = ast.parse(path.read_text(encoding="utf-8"), str(rel))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                problems += [f"{where}: imports {a.name}" for a in node.names if a.name in HUB_CALLS]
            else:
                names = []
            problems += [f"{where}: imports {n}" for n in names
                         if any(n == m or n.startswith(m + ".") for m in NETWORK_MODULES)]
            if isinstance(node, ast.Attribute) and node.attr in HUB_CALLS:
                problems.append(f"{where}: uses .{node.attr}")
            if isinstance(node, ast.Name) and node.id in HUB_CALLS:
                problems.append(f"{where}: uses {node.id}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                    and URL.search(node.value):
                problems.append(f"{where}: URL in code: {node.value[:80]!r}")
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                if name == "socket" and not (node.args and isinstance(node.args[0], ast.Attribute)
                                             and node.args[0].attr == "AF_UNIX"):
                    problems.append(f"{where}: socket() without AF_UNIX")
                if name == "from_pretrained":
                    from_pretrained += 1
                    local = [k for k in node.keywords if k.arg == "local_files_only"]
                    if not (local and isinstance(local[0].value, ast.Constant) and local[0].value.value is True):
                        problems.append(f"{where}: from_pretrained without local_files_only=True")
                if name in {"setdefault", "__setitem__", "putenv"} or isinstance(func, ast.Attribute) \
                        and func.attr == "pop":
                    args = [a.value for a in node.args if isinstance(a, ast.Constant)]
                    if args and args[0] in OFFLINE_VARS and (func.attr == "pop" or args[1:2] != ["1"]):
                        problems.append(f"{where}: {args[0]} set to something else than 1 / removed")
            if isinstance(node, ast.Assign):  # os.environ["HF_HUB_OFFLINE"] = ...
                for target in node.targets:
                    if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant) \
                            and target.slice.value in OFFLINE_VARS and not (
                                isinstance(node.value, ast.Constant) and node.value.value == "1"):
                        problems.append(f"{where}: {target.slice.value} assigned something else than 1")
            if isinstance(node, ast.Delete):
                problems += [f"{where}: deletes {t.slice.value}" for t in node.targets
                             if isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant)
                             and t.slice.value in OFFLINE_VARS]
    return problems, from_pretrained


def test_no_module_fetches_listens_on_tcp_or_enables_the_hub() -> None:
    problems, from_pretrained = scan(_sources())
    assert from_pretrained >= 3  # the scan does see the model loading
    assert not problems, "\n".join(problems)


PLANTED = '''
import os, socket, urllib.request
from huggingface_hub import snapshot_download
URL = "https://huggingface.co/x"
def f():
    """See https://example.org: fine in a docstring."""
    socket.socket()
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    os.environ["HF_HUB_OFFLINE"] = "0"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "0")
    os.environ.pop("HF_HUB_OFFLINE", None)
    del os.environ["HF_HUB_OFFLINE"]
    AutoModel.from_pretrained("x")
    AutoModel.from_pretrained("x", local_files_only=False)
    socket.create_server(("", 80))
    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # fine
'''


def test_the_scan_catches_planted_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(PLANTED)
    problems, _ = scan([bad])
    text = "\n".join(problems)
    for expected in (":2: imports urllib.request", ":3: imports huggingface_hub", ":3: imports snapshot_download",
                     ":4: URL in code", ":7: socket() without AF_UNIX", ":8: socket() without AF_UNIX",
                     ":8: uses .AF_INET", ":9: HF_HUB_OFFLINE assigned", ":10: TRANSFORMERS_OFFLINE set",
                     ":11: HF_HUB_OFFLINE set", ":12: deletes HF_HUB_OFFLINE", ":13: from_pretrained without",
                     ":14: from_pretrained without", ":15: uses .create_server"):
        assert expected in text, (expected, text)
    assert ":6:" not in text and ":16:" not in text, text


def test_the_service_files_keep_the_hub_off() -> None:
    templates = ROOT / "systemd_termux"
    assert "Environment=HF_HUB_OFFLINE=1" in (templates / "pocketd.service").read_text()
    assert "HF_HUB_OFFLINE=1" in (templates / "sv" / "pocketd" / "run").read_text()
    # The installed service files (install-time scripts and requirement lists beside them may name
    # a package index: they run once, by hand, never in the service).
    service_files = [templates / "pocketd.service", *(templates / "sv").rglob("*"), *(templates / "boot").rglob("*")]
    for path in service_files:
        if path.is_file():
            body = path.read_text()
            assert not URL.search(body), path
            assert not re.search(r"HF_HUB_OFFLINE=(?!1\b)|TRANSFORMERS_OFFLINE=(?!1\b)", body), path
