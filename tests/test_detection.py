"""Detection rules (``spec.detect``): the spec, the wire, each rule kind on a real machine, hostile rules,
and the agent's pre-flight before an install and its check-in inventory.

Rules run for real: files in temp dirs, detect commands as subprocesses of
this Python. The Windows registry is the far edge: a stand-in reader.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from test_agent_loop import FakeRelay, files_action, make_tar, relay, results_of  # noqa: F401

from reconciler import protocol, specs
from reconciler.agent.agent import Agent
from reconciler.agent.detection import (
    installed_version,
    inventory,
    remembered,
    run_rule,
)
from reconciler.agent.errors import InstallError
from reconciler.agent.installers import InstallerSpec, Layout, read_receipt
from reconciler.agent.verify import Refusal, Verifier

# ------------------------------------------------------------------ the spec


def package_yaml(detect: str) -> bytes:
    return f"""\
apiVersion: reconciler/v1
kind: Package
metadata: {{name: app-1.0}}
spec:
  name: app
  version: "1.0"
  artifact: {{path: artifacts/app}}
  installer: {{type: files}}
  detect:
{detect}""".encode()


def test_a_file_rule_is_read_into_the_package_and_travels_in_the_installer() -> None:
    package = specs.parse_document("packages/app-1.0.yaml", package_yaml(
        '    file: "${PROGRAMFILES}/App/version.txt"\n    versionPattern: "version=(\\\\S+)"\n'))
    assert isinstance(package, specs.Package)
    assert package.installer.detection == specs.Detection(file="${PROGRAMFILES}/App/version.txt",
                                                          version_pattern="version=(\\S+)")
    assert protocol.installer_of(package.installer)["detection"] == {
        "file": "${PROGRAMFILES}/App/version.txt", "versionPattern": "version=(\\S+)"}


def test_command_and_registry_rules_are_read() -> None:
    package = specs.parse_document("packages/app-1.0.yaml", package_yaml(
        '    command: ["${PYTHON}", "-c", "print(1)"]\n    timeoutSeconds: 5\n'))
    assert isinstance(package, specs.Package)
    assert package.installer.detection == specs.Detection(command=("${PYTHON}", "-c", "print(1)"), timeout_seconds=5)
    package = specs.parse_document("packages/app-1.0.yaml", package_yaml(
        "    registry: {key: 'HKLM\\SOFTWARE\\App', value: DisplayVersion}\n"))
    assert isinstance(package, specs.Package)
    assert package.installer.detection == specs.Detection(registry_key="HKLM\\SOFTWARE\\App",
                                                          registry_value="DisplayVersion")


BAD_RULES = [
    ('    file: "${HOMEDIR}/app"\n', "10:11: error: /spec/detect/file: unknown placeholder '${HOMEDIR}'"),
    ('    command: [app, "${PACKAGEDIR}/x"]\n', "10:20: error: /spec/detect/command/1: unknown placeholder "
                                             "'${PACKAGEDIR}'"),
    ('    file: /opt/app\n    versionPattern: "[0-9.]+"\n', "11:21: error: /spec/detect/versionPattern: pattern "
                                                            "'[0-9.]+' must have exactly one capturing group (the "
                                                            "version), has 0"),
    ('    file: /opt/app\n    versionPattern: "(a)(b)"\n', "11:21: error: /spec/detect/versionPattern: pattern "
                                                           "'(a)(b)' must have exactly one capturing group"),
    ('    file: /opt/app\n    versionPattern: "(unclosed"\n', "11:21: error: /spec/detect/versionPattern: pattern "
                                                              "'(unclosed' is not a valid regular expression"),
    ('    file: /opt/app\n    versionPattern: "((a+)+)"\n', "11:21: error: /spec/detect/versionPattern: pattern "
                                                            "'((a+)+)' repeats an unbounded repetition"),
    ('    file: /opt/app\n    command: [app]\n', "10:5: error: /spec/detect: must have exactly one of command, "
                                                 "file, registry (timeoutSeconds only with command), has command, "
                                                 "file"),
    ("    {}\n", "10:5: error: /spec/detect: must have exactly one of command, file, registry"),
    ('    file: /opt/app\n    timeoutSeconds: 5\n', "10:5: error: /spec/detect: must have exactly one of command, "
                                                     "file, registry (timeoutSeconds only with command), has file"),
    ("    registry: {key: 'SOFTWARE\\App', value: v}\n", "10:21: error: /spec/detect/registry/key:"),
    ("    command: [" + ", ".join(["a"] * 65) + "]\n", "10:14: error: /spec/detect/command: must list at most 64"),
    ('    file: "' + "x" * 1025 + '"\n', "10:11: error: /spec/detect/file:"),
]


@pytest.mark.parametrize(("detect", "expected"), BAD_RULES)
def test_a_bad_rule_is_refused_naming_file_line_and_field(detect: str, expected: str) -> None:
    with pytest.raises(ValueError) as raised:
        specs.parse_document("packages/app-1.0.yaml", package_yaml(detect))
    assert str(raised.value).startswith(f"packages/app-1.0.yaml:{expected}"), str(raised.value)


def test_the_installer_spec_refuses_a_bad_rule_from_the_wire_and_keeps_a_good_one() -> None:
    base = {"type": "files", "install": [], "uninstall": [], "detect": [], "timeoutSeconds": 60}
    good = InstallerSpec.from_dict({**base, "detection": {"file": "${ROOT}/v", "versionPattern": "(\\d+)"}})
    assert good.to_dict()["detection"] == {"file": "${ROOT}/v", "versionPattern": "(\\d+)"}
    for bad, why in (({"file": "/x", "command": ["y"]}, "exactly one of"),
                     ({"command": ["${EVIL}"]}, "unknown placeholder"),
                     ({"file": "/x", "versionPattern": "x"}, "exactly one capturing group"),
                     ("file", "must be an object")):
        with pytest.raises(InstallError) as raised:
            InstallerSpec.from_dict({**base, "detection": bad})
        assert why in raised.value.message


def test_the_verifier_refuses_an_action_whose_rule_is_not_the_package_documents() -> None:
    package = specs.parse_document("packages/app-1.0.yaml", package_yaml('    file: "${ROOT}/app/VERSION"\n'))
    assert isinstance(package, specs.Package)
    wire = dict(protocol.installer_of(package.installer))
    Verifier._check_installer(wire, package)  # the relay's wire form is the document's
    for changed in ({**wire, "detection": {"file": "/tmp/always-there"}}, {k: v for k, v in wire.items()
                                                                          if k != "detection"}):
        with pytest.raises(Refusal) as raised:
            Verifier._check_installer(changed, package)
        assert "detection" in str(raised.value)


# ------------------------------------------------------------------ each kind of rule


def run(rule: dict[str, Any], tmp_path: Path, version: str = "1.0", **kwargs: Any) -> Any:
    kwargs.setdefault("env", dict(os.environ))
    values = {"PYTHON": sys.executable, "ROOT": str(tmp_path), "PACKAGE_DIR": str(tmp_path / "pkg")}
    return run_rule(rule, version, values=values, cwd=tmp_path, **kwargs)


def test_file_rule(tmp_path: Path) -> None:
    target = tmp_path / "App" / "version.txt"
    rule = {"file": "${ROOT}/App/version.txt", "versionPattern": r"version=(\S+)"}
    assert run(rule, tmp_path) is None
    target.parent.mkdir()
    target.write_text("name=app\nversion=9.9\n")
    assert run(rule, tmp_path).version == "9.9"
    target.write_text("no version here\n")  # present, nothing readable: the package's own version
    found = run(rule, tmp_path, version="1.0")
    assert (found.version, "no version read" in found.how) == ("1.0", True)
    assert run({"file": "${ROOT}/App"}, tmp_path).version == "1.0"  # a directory exists too
    target.write_bytes("\ufeffversion=2.5\r\n".encode("utf-16"))  # Windows tools write UTF-16
    assert run(rule, tmp_path).version == "2.5"


def test_file_rule_reads_only_the_first_64_kib(tmp_path: Path) -> None:
    (tmp_path / "big.txt").write_bytes(b"x" * (64 * 1024) + b"version=9.9\n")
    found = run({"file": "${ROOT}/big.txt", "versionPattern": r"version=(\S+)"}, tmp_path, version="1.0")
    assert found.version == "1.0"


def test_environment_placeholders_come_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "pf" / "App").mkdir(parents=True)
    rule = {"file": "${PROGRAMFILES}/App"}
    assert run(rule, tmp_path, env={"ProgramFiles": str(tmp_path / "pf")}) is not None
    assert run(rule, tmp_path, env={"PROGRAMFILES": str(tmp_path / "pf")}) is not None  # os.environ on Windows
    assert run(rule, tmp_path, env={}) is None  # not set: the rule cannot match


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFO")
def test_a_fifo_is_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    found = run({"file": "${ROOT}/fifo", "versionPattern": "(.+)"}, tmp_path, version="1.0")
    assert found is not None and found.version == "1.0"  # present; reading it would block forever


def py(code: str) -> list[str]:
    return ["${PYTHON}", "-c", code]


def test_command_rule(tmp_path: Path) -> None:
    assert run({"command": py("print('9.9'); print('more')")}, tmp_path).version == "9.9"
    assert run({"command": py("print('App version 3.1.4 (build 7)')"), "versionPattern": r"version (\S+)"},
               tmp_path).version == "3.1.4"
    assert run({"command": py("import sys; print('9.9'); sys.exit(1)")}, tmp_path) is None
    assert run({"command": py("pass")}, tmp_path, version="1.0").version == "1.0"
    assert run({"command": ["${ROOT}/no-such-program"]}, tmp_path) is None
    script = tmp_path / "pkg"
    script.mkdir()
    assert run({"command": py("import os,sys; print(os.path.basename(sys.argv[1]))") + ["${PACKAGE_DIR}"]},
               tmp_path).version == "pkg"


def test_hostile_commands(tmp_path: Path) -> None:
    ten_mb = py("import sys; sys.stdout.write('7.0\\n' + 'x' * (10 * 1024 * 1024))")
    assert run({"command": ten_mb}, tmp_path).version == "7.0"  # read: the first 64 KiB only
    endless = py("import sys\nwhile True: sys.stdout.write('y' * 65536)")
    assert run({"command": endless}, tmp_path) is None  # killed past 16 MiB
    assert run({"command": py("import sys; sys.stdout.buffer.write(b'\\xff\\xfe\\x00garbage')")}, tmp_path,
               version="1.0").version == "1.0"  # not UTF-8: present, no version read
    assert run({"command": py("import time; print('9.9', flush=True); time.sleep(600)"), "timeoutSeconds": 1},
               tmp_path) is None  # hung: killed, absent
    assert run({"command": py("import os; os.abort()")}, tmp_path) is None  # crashed
    assert run({"command": py("print('1.0')"), "versionPattern": r"release (\d+)"}, tmp_path,
               version="4.2").version == "4.2"  # pattern matching nothing


def test_a_hung_detect_does_not_leave_its_record(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    layout.create()
    installer = InstallerSpec("files", detection={"command": py("import time; time.sleep(600)"),
                                                  "timeoutSeconds": 1})
    assert installed_version(layout, "app", "1.0", installer) is None
    assert not layout.detect_process.exists()


def test_registry_rule_with_a_stand_in_reader(tmp_path: Path) -> None:
    values = {("HKLM\\SOFTWARE\\App", "DisplayVersion"): "9.9.1", ("HKLM\\SOFTWARE\\Other", "Version"): "v 2 x"}
    calls: list[tuple[str, str]] = []

    def reader(key: str, value: str) -> str | None:
        calls.append((key, value))
        return values.get((key, value))

    rule = {"registry": {"key": "HKLM\\SOFTWARE\\App", "value": "DisplayVersion"}}
    assert run(rule, tmp_path, registry=reader).version == "9.9.1"
    assert run({"registry": {"key": "HKLM\\SOFTWARE\\Gone", "value": "DisplayVersion"}}, tmp_path,
               registry=reader) is None
    assert run({"registry": {"key": "HKLM\\SOFTWARE\\Other", "value": "Version"}, "versionPattern": r"v (\d+)"},
               tmp_path, registry=reader).version == "2"
    assert run(rule, tmp_path) is None  # no registry on this system: never matches

    def broken(key: str, value: str) -> str | None:
        raise PermissionError("access denied")

    assert run(rule, tmp_path, registry=broken) is None
    assert calls[0] == ("HKLM\\SOFTWARE\\App", "DisplayVersion")


# ------------------------------------------------------------------ the agent: pre-flight and inventory

# The install script writes the version file the rule reads, as a real installer would.
INSTALL = """\
import os, sys
root = os.environ["RECONCILER_ROOT"]
with open(os.path.join(root, "ran.log"), "a") as log:
    log.write(os.environ["RECONCILER_PACKAGE_VERSION"] + "\\n")
if sys.argv[1] == "write":
    os.makedirs(os.path.join(root, "apps", "app"), exist_ok=True)
    with open(os.path.join(root, "apps", "app", "VERSION"), "w") as f:
        f.write("version=" + os.environ["RECONCILER_PACKAGE_VERSION"] + "\\n")
"""
RULE = {"file": "${ROOT}/apps/app/VERSION", "versionPattern": r"version=(\S+)"}


def app_action(relay: FakeRelay, op: str, version: str = "1.0", kind: str = "install", write: bool = True,
               rule: dict[str, Any] | None = RULE) -> dict[str, Any]:
    content, sha = make_tar({"install.py": INSTALL})
    relay.artifacts[sha] = content
    action = files_action(op, sha, len(content), name="app", version=version, kind=kind)
    action["installer"] = {"type": "command", "install": ["${PYTHON}", "install.py", "write" if write else "no"],
                           "uninstall": ["${PYTHON}", "-c", "pass"], "detect": [], "timeoutSeconds": 60}
    if rule is not None:
        action["installer"]["detection"] = rule
    return action


def by_hand(root: Path, version: str) -> None:
    (root / "apps" / "app").mkdir(parents=True, exist_ok=True)
    (root / "apps" / "app" / "VERSION").write_text(f"version={version}\n")


def ran(root: Path) -> list[str]:
    path = root / "ran.log"
    return path.read_text().splitlines() if path.exists() else []


def step_twice(relay: FakeRelay, root: Path, *actions: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    relay.replies.append(list(actions))
    agent = Agent("pc-det", relay.url, root, {}, {}, insecure_http=True)
    agent.step()
    agent.step()
    body = relay.checkins[-1]["body"]
    return results_of(body), body["inventory"]


def test_the_same_version_installed_by_hand_is_adopted_without_running_anything(relay: FakeRelay,
                                                                                tmp_path: Path) -> None:
    root = tmp_path / "root"
    by_hand(root, "1.0")
    results, inv = step_twice(relay, root, app_action(relay, "op-1"))
    assert results["op-1"]["status"] == "succeeded"
    assert "already present" in results["op-1"]["message"] and "adopted" in results["op-1"]["message"]
    assert ran(root) == []
    assert not (root / "packages" / "app").exists()
    receipt = read_receipt(Layout(root), "app")
    assert receipt is not None and (receipt.version, receipt.origin) == ("1.0", "detected")
    assert json.loads((root / "receipts" / "app.json").read_text())["origin"] == "detected"
    assert inv == [{"name": "app", "version": "1.0", "source": "detected"}]


def test_a_newer_version_present_is_left_alone_and_reported(relay: FakeRelay, tmp_path: Path) -> None:
    root = tmp_path / "root"
    by_hand(root, "9.9")
    results, inv = step_twice(relay, root, app_action(relay, "op-1"))
    assert (results["op-1"]["status"], results["op-1"]["message"].split(" (")[0]) == (
        "succeeded", "not installed: newer version 9.9 present")
    assert ran(root) == [] and read_receipt(Layout(root), "app") is None
    assert inv == [{"name": "app", "version": "9.9", "source": "detected"}]


def test_a_downgrade_runs_over_a_newer_version(relay: FakeRelay, tmp_path: Path) -> None:
    root = tmp_path / "root"
    by_hand(root, "9.9")
    results, inv = step_twice(relay, root, app_action(relay, "op-1", kind="downgrade"))
    assert results["op-1"]["status"] == "succeeded", results
    assert ran(root) == ["1.0"]
    assert inv == [{"name": "app", "version": "1.0"}]


def test_an_older_version_is_upgraded(relay: FakeRelay, tmp_path: Path) -> None:
    root = tmp_path / "root"
    by_hand(root, "0.5")
    results, inv = step_twice(relay, root, app_action(relay, "op-1"))
    assert results["op-1"]["status"] == "succeeded"
    assert ran(root) == ["1.0"]
    assert inv == [{"name": "app", "version": "1.0"}]


def test_absent_it_installs_and_the_rule_must_then_find_it(relay: FakeRelay, tmp_path: Path) -> None:
    root = tmp_path / "root"
    results, inv = step_twice(relay, root, app_action(relay, "op-1"), app_action(relay, "op-2", version="2.0",
                                                                                  write=False))
    assert results["op-1"]["status"] == "succeeded"
    assert (results["op-2"]["status"], results["op-2"]["message"]) == (
        "failed", "installed app 2.0, but the package's detection rule finds version 1.0")
    assert ran(root) == ["1.0", "2.0"]


def test_the_check_in_reports_what_the_rule_finds_receipt_or_not(relay: FakeRelay, tmp_path: Path) -> None:
    root = tmp_path / "root"
    results, inv = step_twice(relay, root, app_action(relay, "op-1"))
    assert inv == [{"name": "app", "version": "1.0"}]
    layout = Layout(root)
    assert set(remembered(layout)) == {"app"}
    by_hand(root, "3.0")  # someone upgraded it by hand
    assert inventory(layout) == [{"name": "app", "version": "3.0", "source": "detected"}]
    (root / "apps" / "app" / "VERSION").unlink()  # ... or removed it
    assert inventory(layout) == []
    (root / "receipts" / "app.json").unlink()
    by_hand(root, "0.1")  # no receipt at all: still seen
    assert inventory(layout) == [{"name": "app", "version": "0.1", "source": "detected"}]


def test_an_uninstall_forgets_the_rule(relay: FakeRelay, tmp_path: Path) -> None:
    root = tmp_path / "root"
    by_hand(root, "9.9")
    uninstall = {"operationId": "op-2", "job": "remove-app", "action": "uninstall",
                 "package": {"name": "app", "version": None}, "previousVersion": None, "artifact": None,
                 "installer": None}
    results, inv = step_twice(relay, root, app_action(relay, "op-1"), uninstall)
    assert results["op-2"]["status"] == "succeeded"
    assert inv == []  # software installed by other means is not removed, and no longer looked for
    assert (root / "apps" / "app" / "VERSION").exists()


def test_a_hung_or_broken_rule_costs_only_its_own_package(tmp_path: Path) -> None:
    from reconciler.agent.detection import remember
    layout = Layout(tmp_path / "root")
    layout.create()
    by_hand(layout.root, "2.0")
    remember(layout, "app", "1.0", InstallerSpec("files", detection=RULE))
    remember(layout, "hung", "1.0", InstallerSpec("files", detection={
        "command": py("import time; time.sleep(600)"), "timeoutSeconds": 1}))
    remember(layout, "crash", "1.0", InstallerSpec("files", detection={"command": py("import os; os.abort()")}))
    (layout.detections / "junk.json").write_text("{ not json")
    assert inventory(layout) == [{"name": "app", "version": "2.0", "source": "detected"}]
    assert (layout.detections / "junk.json.corrupt").exists()
    assert not layout.detect_process.exists()
