"""Nothing the agent sends can hold text that is not valid Unicode.

Bytes that are not UTF-8 reach Python as lone surrogates (``surrogateescape``):
in argv, in host names, in paths. JSON can carry them only as ``\\udcff``
escapes that the relay cannot store. So the agent refuses such command-line
text at start-up (exit 2, one line naming the flag), and replaces undecodable
bytes in what it reads from the operating system. The tests run the real CLI
with bytes in argv, and check every string of every check-in the fake relay
of ``test_agent_loop.py`` received.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_agent_loop import (  # noqa: F401
    PROJECT_ROOT,
    FakeRelay,
    closed_port,
    files_action,
    make_tar,
    relay,
    results_of,
)

POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="POSIX argv and paths are bytes")


def agent_argv(root: bytes, relay_url: bytes, *extra: bytes) -> list[bytes]:
    return [os.fsencode(sys.executable), b"-m", b"reconciler", b"agent", b"--id", b"pc-text", b"--relay", relay_url,
            b"--insecure-http", b"--insecure-unsigned-actions", b"--root", root, *extra, b"--once"]


def run_cli(argv: list[bytes]) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(argv, cwd=PROJECT_ROOT, env=env, capture_output=True, timeout=120)


def strings(value: Any) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in strings(k) + strings(v)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return []


def assert_all_text(relay: FakeRelay) -> None:
    for body in relay.bodies():
        for text in strings(body):
            text.encode("utf-8")  # raises on a lone surrogate


@POSIX_ONLY
@pytest.mark.parametrize("flag, value, shown", [
    (b"--label", b"dept=\xff", "b'dept=\\xff'"),
    (b"--label", b"d\xffpt=sales", "b'd\\xffpt=sales'"),
    (b"--fact", b"hostname=pc\xff", "b'hostname=pc\\xff'"),
    (b"--id", b"pc\xff", "b'pc\\xff'"),
    (b"--relay", b"http://relay\xff:8080", "b'http://relay\\xff:8080'"),
    (b"--relay", b"http://user:secret@relay\xff:8080", "b'http://***@relay\\xff:8080'"),
])
def test_text_that_is_not_utf8_is_refused_at_start_up(flag: bytes, value: bytes, shown: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    argv = agent_argv(os.fsencode(root), f"http://127.0.0.1:{closed_port()}".encode(), flag, value)
    proc = run_cli(argv)
    err = proc.stderr.decode("utf-8")
    assert proc.returncode == 2, err
    assert err.splitlines() == [f"reconciler agent: {flag.decode()} {shown}: not valid text in this locale's "
                                f"encoding (UTF-8); use UTF-8 characters only"]
    assert not root.exists()  # refused before anything was written


INSTALL = """\
import os, sys
print("installed into", os.environ["RECONCILER_PACKAGE_DIR"], flush=True)
sys.stdout.buffer.write(b"raw bytes: \\xff\\xfe\\n")
"""


@POSIX_ONLY
def test_a_root_that_is_not_utf8_works_and_sends_only_text(relay: FakeRelay, tmp_path: Path) -> None:
    content, sha = make_tar({"install.py": INSTALL})
    relay.artifacts[sha] = content
    action = files_action("op-text", sha, len(content), name="tool")
    action["installer"] = {"type": "command", "install": ["${PYTHON}", "install.py"], "uninstall": [],
                           "detect": ["${PYTHON}", "-c", "pass"], "timeoutSeconds": 60}
    relay.replies.append([action])
    root = os.fsencode(tmp_path) + b"/r\xf6\xf6t"  # Latin-1, as an old file system might hold it
    proc = run_cli(agent_argv(root, relay.url.encode()))
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    assert_all_text(relay)
    message = results_of(relay.checkins[-1]["body"])["op-text"]["message"]
    assert message.startswith(f"installed into {os.fsdecode(tmp_path)}/r\ufffd\ufffdt/packages/tool/1.0\n")
    assert message.endswith("raw bytes: \ufffd\ufffd")
    assert relay.checkins[-1]["body"]["inventory"] == [{"name": "tool", "version": "1.0"}]


def _can_set_hostname() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-u", sys.executable, "-c", "import socket; socket.sethostname(b'probe')"],
                           capture_output=True, timeout=60)
    return probe.returncode == 0


SET_HOSTNAME_THEN_RUN = """\
import socket, sys
socket.sethostname(b"pc\\xffx")
from reconciler.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not _can_set_hostname(), reason="needs a Linux UTS namespace (unshare -u, as root)")
def test_a_host_name_that_is_not_utf8_is_sent_as_text(relay: FakeRelay, tmp_path: Path) -> None:
    argv = ["unshare", "-u", sys.executable, "-c", SET_HOSTNAME_THEN_RUN, "agent", "--id", "pc-host", "--relay",
            relay.url, "--insecure-http", "--insecure-unsigned-actions", "--root", str(tmp_path / "root"), "--once"]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run(argv, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_all_text(relay)
    assert relay.checkins[0]["body"]["facts"]["hostname"] == "pc\ufffdx"
