"""Native installer types through the agent's real install path.

``deb`` (and ``rpm`` where ``rpmbuild`` is installed) run the real package
manager against a sandbox root in ``tmp_path``: the package is built in the
test, installed, upgraded, detected and removed, and the machine's own
package database is checked to be untouched. ``msi`` and ``exe`` run against
stand-ins (an executable named ``msiexec`` on PATH, an .exe that is a script)
that record their argv and exit with the code under test: Windows itself is
not exercised here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.agent import detection, native
from reconciler.agent.errors import InstallError
from reconciler.agent.installers import (
    ArtifactRef,
    InstallerSpec,
    Layout,
    Outcome,
    _native_drift,
    install,
    inventory,
    is_present,
    read_receipt,
    uninstall,
)

PRODUCT = "{8A1F3C2D-1B2C-4D5E-8F90-A1B2C3D4E5F6}"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ref(path: Path, name: str | None = None) -> ArtifactRef:
    return ArtifactRef(_sha(path), "file", path.stat().st_size, name or path.name)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


# ------------------------------------------------------------------ deb

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None,
                                reason="dpkg-deb is not installed (Debian's dpkg package)")

DEB_NAME = "reconciler-test-hello"


def build_deb(where: Path, version: str, package: str = DEB_NAME, depends: str = "") -> Path:
    """A maintainer-script-free .deb holding /opt/<package>/version.txt."""
    tree = where / f"tree-{package}-{version}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
        + (f"Depends: {depends}\n" if depends else "")
        + "Maintainer: Test <test@example.org>\nDescription: a file under /opt\n")
    (tree / "opt" / package).mkdir(parents=True)
    (tree / "opt" / package / "version.txt").write_text(version + "\n")
    out = where / f"{package}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(out)], check=True,
                   capture_output=True)
    return out


def _status(sandbox: Path, package: str) -> str:
    """The package's stanza in the sandbox's dpkg status file ('' if none)."""
    text = (sandbox / "var/lib/dpkg/status").read_text()
    for stanza in text.split("\n\n"):
        if f"Package: {package}\n" in stanza + "\n":
            return stanza
    return ""


def _deb(package: str = DEB_NAME, **extra: Any) -> InstallerSpec:
    return InstallerSpec.from_dict({"type": "deb", "packageName": package, **extra})


def _real_system_has_no(package: str) -> None:
    """The machine's own dpkg never heard of the package, and /opt has no trace of it."""
    done = _run(["dpkg-query", "-W", "-f=${Status} ${Version}", package])
    assert done.returncode != 0 or "installed" not in done.stdout.split(), done.stdout
    assert not Path("/opt", package).exists()


@needs_dpkg
def test_deb_install_upgrade_detect_remove_in_a_sandbox(tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    layout = Layout(tmp_path / "agent", dpkg_root=sandbox)
    layout.create()
    v10, v11 = build_deb(tmp_path, "1.0"), build_deb(tmp_path, "1.1")

    outcome = install(layout, "hello", "1.0", _deb(), v10, _ref(v10), "op-1")
    assert outcome == Outcome(0, outcome.message) and not outcome.reboot_required
    stanza = _status(sandbox, DEB_NAME)
    assert "Status: install ok installed" in stanza and "Version: 1.0" in stanza
    assert (sandbox / "opt" / DEB_NAME / "version.txt").read_text() == "1.0\n"
    assert native.dpkg_installed_version(DEB_NAME, sandbox) == "1.0"
    receipt = read_receipt(layout, "hello")
    assert receipt is not None and receipt.installer.package_name == DEB_NAME
    assert json.loads(layout.receipt("hello").read_text())["installer"]["packageName"] == DEB_NAME
    assert inventory(layout) == [{"name": "hello", "version": "1.0"}]
    _real_system_has_no(DEB_NAME)

    install(layout, "hello", "1.1", _deb(), v11, _ref(v11), "op-2")  # in place: dpkg -i, no removal first
    stanza = _status(sandbox, DEB_NAME)
    assert "Status: install ok installed" in stanza and "Version: 1.1" in stanza
    assert (sandbox / "opt" / DEB_NAME / "version.txt").read_text() == "1.1\n"
    assert inventory(layout) == [{"name": "hello", "version": "1.1"}]
    assert not layout.package_dir("hello", "1.0").exists()
    dpkg_log = (sandbox / "var/log/dpkg.log").read_text()
    assert f"upgrade {DEB_NAME}:all 1.0 1.1" in dpkg_log and f"remove {DEB_NAME}" not in dpkg_log

    removed = uninstall(layout, "hello", None, "op-3")
    assert removed.exit_code == 0 and read_receipt(layout, "hello") is None
    assert "install ok installed" not in _status(sandbox, DEB_NAME)
    assert native.dpkg_installed_version(DEB_NAME, sandbox) is None
    assert not (sandbox / "opt" / DEB_NAME / "version.txt").exists()
    assert inventory(layout) == []
    _real_system_has_no(DEB_NAME)


@needs_dpkg
def test_deb_downgrade_and_drift(tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    layout = Layout(tmp_path / "agent", dpkg_root=sandbox)
    layout.create()
    v10, v11 = build_deb(tmp_path, "1.0"), build_deb(tmp_path, "1.1")
    install(layout, "hello", "1.1", _deb(), v11, _ref(v11), "op-1")
    install(layout, "hello", "1.0", _deb(), v10, _ref(v10), "op-2")
    assert native.dpkg_installed_version(DEB_NAME, sandbox) == "1.0"
    receipt = read_receipt(layout, "hello")
    assert receipt is not None and receipt.version == "1.0" and is_present(layout, receipt)
    # removed behind the agent's back: the receipt no longer counts, and uninstall just drops it
    subprocess.run(["dpkg", *native.dpkg_options(sandbox), "-r", DEB_NAME], check=True, capture_output=True)
    assert not is_present(layout, receipt) and inventory(layout) == []
    outcome = uninstall(layout, "hello", None, "op-3")
    assert "was not installed" in outcome.message and read_receipt(layout, "hello") is None


@needs_dpkg
def test_deb_content_drift_is_verified_once_per_rehash_interval(tmp_path: Path) -> None:
    """dpkg --verify reads every file: it runs once per --rehash-interval, and its finding stands until reinstalled."""
    sandbox = tmp_path / "sandbox"
    layout = Layout(tmp_path / "agent", dpkg_root=sandbox, rehash_seconds=3600.0)
    layout.create()
    v10 = build_deb(tmp_path, "1.0")
    install(layout, "hello", "1.0", _deb(), v10, _ref(v10), "op-1")
    receipt = read_receipt(layout, "hello")
    assert receipt is not None
    start = time.time()
    assert not _native_drift(layout, receipt, start)  # verified clean, and recorded
    shipped = sandbox / "opt" / DEB_NAME / "version.txt"
    shipped.write_text("9.9\n")  # edited by hand, same size
    assert not _native_drift(layout, receipt, start + 60)  # within the interval: not read again
    assert _native_drift(layout, receipt, start + 3600)  # due: dpkg --verify sees the changed digest
    assert _native_drift(layout, receipt, start + 3601)  # and it stays drifted (nothing recorded) ...
    assert not is_present(layout, receipt) and inventory(layout) == []
    install(layout, "hello", "1.0", _deb(), v10, _ref(v10), "op-2")  # ... until installed again
    assert shipped.read_text() == "1.0\n"
    assert not _native_drift(layout, receipt, start + 3602) and inventory(layout) == [
        {"name": "hello", "version": "1.0"}]


@needs_dpkg
def test_a_check_in_asks_dpkg_once_per_deb_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The detection that finds the receipt's version answers for the receipt too: dpkg-query runs once."""
    sandbox = tmp_path / "sandbox"
    layout = Layout(tmp_path / "agent", dpkg_root=sandbox)
    layout.create()
    v10 = build_deb(tmp_path, "1.0")
    install(layout, "hello", "1.0", _deb(), v10, _ref(v10), "op-1")
    detection.remember(layout, "hello", "1.0", _deb())
    shims, calls = tmp_path / "shims", tmp_path / "dpkg-query-calls"
    shims.mkdir()
    real = native.find_tool("dpkg-query")
    (shims / "dpkg-query").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexec "{real}" "$@"\n')
    (shims / "dpkg-query").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ['PATH']}")
    assert detection.inventory(layout) == [{"name": "hello", "version": "1.0"}]
    assert len(calls.read_text().splitlines()) == 1


@needs_dpkg
def test_deb_of_another_version_or_name_is_refused_before_dpkg_runs(tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    layout = Layout(tmp_path / "agent", dpkg_root=sandbox)
    layout.create()
    v11 = build_deb(tmp_path, "1.1")
    with pytest.raises(InstallError, match=r"version '1\.1', the spec's version is '1\.2'"):
        install(layout, "hello", "1.2", _deb(), v11, _ref(v11), "op-1")
    with pytest.raises(InstallError, match=r"is package 'reconciler-test-hello', the spec's packageName is 'other'"):
        install(layout, "hello", "1.1", _deb("other"), v11, _ref(v11), "op-2")
    assert native.dpkg_installed_version(DEB_NAME, sandbox) is None
    assert not (sandbox / "opt" / DEB_NAME).exists()
    assert read_receipt(layout, "hello") is None and not layout.package_dir("hello", "1.1").exists()


@needs_dpkg
def test_an_unmet_dependency_fails_dpkg_and_the_install(tmp_path: Path) -> None:
    """dpkg resolves nothing: a Depends that is not installed fails ``dpkg -i`` with its exit code."""
    sandbox = tmp_path / "sandbox"
    layout = Layout(tmp_path / "agent", dpkg_root=sandbox)
    layout.create()
    v10 = build_deb(tmp_path, "1.0")
    install(layout, "hello", "1.0", _deb(), v10, _ref(v10), "op-1")
    needy = build_deb(tmp_path / "needy", "1.1", depends="reconciler-test-missing")
    with pytest.raises(InstallError) as caught:
        install(layout, "hello", "1.1", _deb(), needy, _ref(needy), "op-2")
    assert caught.value.exit_code == 1 and caught.value.message.startswith("exit code 1: ")
    assert "reconciler-test-missing" in caught.value.message
    # dpkg unpacked 1.1 and left it unconfigured: neither version counts as installed any more
    assert native.dpkg_installed_version(DEB_NAME, sandbox) is None
    assert read_receipt(layout, "hello") is None and inventory(layout) == []


@needs_dpkg
def test_a_dpkg_that_installs_nothing_fails_the_version_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After ``dpkg -i``, dpkg-query must report the spec's version: a dpkg that exits 0 and does nothing
    (a stand-in first on PATH) leaves the package not installed, and the install fails saying so."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "dpkg-calls.jsonl"
    _standin(bin_dir / "dpkg", calls)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    sandbox = tmp_path / "sandbox"
    layout = Layout(tmp_path / "agent", dpkg_root=sandbox)
    layout.create()
    v10 = build_deb(tmp_path, "1.0")
    with pytest.raises(InstallError, match=f"^after installing, dpkg reports {DEB_NAME} not installed, not 1.0$"):
        install(layout, "hello", "1.0", _deb(), v10, _ref(v10), "op-1")
    target = layout.package_dir("hello", "1.0") / v10.name
    assert _calls(calls) == [[str(bin_dir / "dpkg"), f"--root={sandbox}", f"--log={sandbox}/var/log/dpkg.log",
                              "--force-not-root", "--force-script-chrootless", "-i", str(target)]]
    assert read_receipt(layout, "hello") is None


@needs_dpkg
def test_a_failing_dpkg_fails_the_install_with_its_exit_code(tmp_path: Path) -> None:
    """A file named .deb that is not one: dpkg-deb cannot read it, nothing is installed."""
    layout = Layout(tmp_path / "agent", dpkg_root=tmp_path / "sandbox")
    layout.create()
    bogus = tmp_path / "bogus_1.0_all.deb"
    bogus.write_bytes(b"not an archive")
    with pytest.raises(InstallError, match="cannot read the .deb bogus_1.0_all.deb: exit code 2"):
        install(layout, "hello", "1.0", _deb(), bogus, _ref(bogus), "op-1")
    assert read_receipt(layout, "hello") is None


@needs_dpkg
def test_agent_with_dpkg_root_runs_a_deb_action(tmp_path: Path) -> None:
    """The agent's --dpkg-root reaches dpkg through run_action (artifact already in the agent's cache)."""
    from reconciler.agent.agent import Agent
    from reconciler.cli import build_parser

    sandbox = tmp_path / "sandbox"
    args = build_parser().parse_args(["agent", "--id", "pc-deb-1", "--relay", "http://127.0.0.1:9",
                                      "--root", str(tmp_path / "agent"), "--dpkg-root", str(sandbox)])
    assert Path(args.dpkg_root) == sandbox
    agent = Agent("pc-deb-1", "http://127.0.0.1:9", tmp_path / "agent", insecure_http=True,
                  dpkg_root=Path(args.dpkg_root))
    deb = build_deb(tmp_path, "1.0")
    ref = _ref(deb)
    shutil.copyfile(deb, agent.layout.cached_artifact(ref.sha256))
    action = {"operationId": "op-deb-1", "job": "hello", "action": "install",
              "package": {"name": "hello", "version": "1.0"}, "previousVersion": None,
              "artifact": ref.to_dict() | {"size": ref.size},
              "installer": {"type": "deb", "install": [], "uninstall": [], "detect": [], "timeoutSeconds": 120,
                            "packageName": DEB_NAME}}
    result = agent.run_action(action)
    assert result is not None and result["status"] == "succeeded", result
    assert native.dpkg_installed_version(DEB_NAME, sandbox) == "1.0"
    _real_system_has_no(DEB_NAME)


def test_dpkg_root_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from reconciler import settings
    from reconciler.cli import build_parser

    monkeypatch.setenv("RECONCILER_DPKG_ROOT", str(tmp_path / "sb"))
    monkeypatch.setenv("RECONCILER_RPM_ROOT", str(tmp_path / "rb"))
    parser = build_parser()
    with settings.parsing(parser):
        args = parser.parse_args(["agent", "--id", "pc-1", "--relay", "http://127.0.0.1:9", "--root", "r"])
    settings.fill(parser, args)
    assert (args.dpkg_root, args.rpm_root) == (str(tmp_path / "sb"), str(tmp_path / "rb"))


# ------------------------------------------------------------------ rpm

needs_rpm = pytest.mark.skipif(shutil.which("rpmbuild") is None or shutil.which("rpm") is None,
                               reason="rpm and rpmbuild are not installed (apt-get install rpm)")
RPM_NAME = "reconciler-test-rpm"


def build_rpm(where: Path, version: str, release: str = "1") -> Path:
    top = where / f"rpmbuild-{version}-{release}"
    (top / "SPECS").mkdir(parents=True)
    spec = top / "SPECS" / "hello.spec"
    spec.write_text(f"""Name: {RPM_NAME}
Version: {version}
Release: {release}
Summary: a file under /opt
License: MIT
BuildArch: noarch
%description
a file under /opt
%install
mkdir -p %{{buildroot}}/opt/{RPM_NAME}
echo {version}-{release} > %{{buildroot}}/opt/{RPM_NAME}/version.txt
%files
/opt/{RPM_NAME}/version.txt
""")
    subprocess.run(["rpmbuild", "--define", f"_topdir {top}", "--define", f"_rpmdir {top / 'out'}",
                    "--define", f"_dbpath {top / 'db'}", "-bb", str(spec)], check=True, capture_output=True)
    return top / "out" / "noarch" / f"{RPM_NAME}-{version}-{release}.noarch.rpm"


def _rpm(**extra: Any) -> InstallerSpec:
    return InstallerSpec.from_dict({"type": "rpm", "packageName": RPM_NAME, **extra})


@needs_rpm
def test_rpm_install_upgrade_downgrade_remove_in_a_sandbox(tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    layout = Layout(tmp_path / "agent", rpm_root=sandbox)
    layout.create()
    r10, r11 = build_rpm(tmp_path, "1.0"), build_rpm(tmp_path, "1.1")

    install(layout, "hello", "1.0-1", _rpm(), r10, _ref(r10), "op-1")
    assert native.rpm_installed_version(RPM_NAME, sandbox) == "1.0-1"
    assert (sandbox / "opt" / RPM_NAME / "version.txt").read_text() == "1.0-1\n"
    assert (sandbox / "var/lib/rpm").is_dir()  # the sandbox's own database
    assert inventory(layout) == [{"name": "hello", "version": "1.0-1"}]

    install(layout, "hello", "1.1-1", _rpm(), r11, _ref(r11), "op-2")
    assert native.rpm_installed_version(RPM_NAME, sandbox) == "1.1-1"
    assert (sandbox / "opt" / RPM_NAME / "version.txt").read_text() == "1.1-1\n"
    install(layout, "hello", "1.0-1", _rpm(), r10, _ref(r10), "op-3")  # downgrade: --oldpackage
    assert native.rpm_installed_version(RPM_NAME, sandbox) == "1.0-1"
    with pytest.raises(InstallError, match=r"version '1\.1-1', the spec's version is '1\.1'"):
        install(layout, "hello", "1.1", _rpm(), r11, _ref(r11), "op-4")
    receipt = read_receipt(layout, "hello")
    assert receipt is not None and receipt.version == "1.0-1" and is_present(layout, receipt)

    uninstall(layout, "hello", None, "op-5")
    assert native.rpm_installed_version(RPM_NAME, sandbox) is None
    assert not (sandbox / "opt" / RPM_NAME / "version.txt").exists()
    assert read_receipt(layout, "hello") is None
    assert _run(["rpm", "-q", RPM_NAME]).returncode != 0  # the machine's own database: untouched
    assert not Path("/opt", RPM_NAME).exists()


# ------------------------------------------------------------------ msi and exe stand-ins


def _standin(path: Path, calls: Path) -> Path:
    """An executable that appends its argv to ``calls`` and exits with $STANDIN_EXIT (default 0)."""
    path.write_text(f"#!{sys.executable}\n"
                    "import json, os, sys\n"
                    f"with open({str(calls)!r}, 'a') as f:\n"
                    "    f.write(json.dumps(sys.argv) + '\\n')\n"
                    "print('stand-in ran')\n"
                    "sys.exit(int(os.environ.get('STANDIN_EXIT', '0')))\n")
    path.chmod(0o755)
    return path


def _calls(calls: Path) -> list[list[str]]:
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


@pytest.fixture()
def msiexec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    if os.name == "nt":
        pytest.skip("the msiexec stand-in is a POSIX script")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "msiexec-calls.jsonl"
    tool = _standin(bin_dir / "msiexec", calls)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return tool, calls


def _windows_exit(layout: Layout, operation_id: str, command: str, version: str, code: int) -> None:
    """Record that ``command`` of an operation ended with ``code``, as the supervisor does on Windows.

    A POSIX exit status has 8 bits (3010 arrives as 194), so the stand-in
    cannot exit with Windows Installer's codes above 255. The operation then
    takes this recorded result instead of running the command, as a resumed
    operation does (supervisor.py), and install()/uninstall() map it.
    """
    attempt = layout.operation_runs(operation_id) / f"{command}-{version}" / "1"
    attempt.mkdir(parents=True)
    (attempt / "claim").write_text("test\n")
    (attempt / "result.json").write_text(json.dumps({"exitCode": code, "output": "msiexec stand-in",
                                                     "timedOut": False}))


def _msi_file(tmp_path: Path) -> Path:
    msi = tmp_path / "Hello-1.0.msi"
    msi.write_bytes(b"stand-in msi")
    return msi


def _msi(**extra: Any) -> InstallerSpec:
    return InstallerSpec.from_dict({"type": "msi", "productCode": PRODUCT,
                                    "properties": {"INSTALLDIR": r"C:\Program Files\Hello", "ALLUSERS": "1"},
                                    **extra})


def test_msi_install_argv_and_success(tmp_path: Path, msiexec: tuple[Path, Path]) -> None:
    tool, calls = msiexec
    layout = Layout(tmp_path / "agent")
    layout.create()
    msi = _msi_file(tmp_path)
    outcome = install(layout, "hello", "1.0", _msi(), msi, _ref(msi), "op-1")
    assert outcome.exit_code == 0 and not outcome.reboot_required
    target = layout.package_dir("hello", "1.0") / msi.name
    log_file = layout.installer_log("hello", "1.0", "install")
    assert _calls(calls) == [[str(tool), "/i", str(target), "/qn", "/norestart", "/l*v", str(log_file),
                              r"INSTALLDIR=C:\Program Files\Hello", "ALLUSERS=1"]]
    receipt = json.loads(layout.receipt("hello").read_text())
    assert receipt["installer"]["productCode"] == PRODUCT
    assert receipt["installer"]["properties"] == {"INSTALLDIR": r"C:\Program Files\Hello", "ALLUSERS": "1"}


@pytest.mark.parametrize("code", [3010, 1641])
def test_msi_reboot_codes_succeed_with_reboot_required(tmp_path: Path, msiexec: tuple[Path, Path],
                                                       code: int) -> None:
    layout = Layout(tmp_path / "agent")
    layout.create()
    msi = _msi_file(tmp_path)
    _windows_exit(layout, "op-1", "install", "1.0", code)
    outcome = install(layout, "hello", "1.0", _msi(), msi, _ref(msi), "op-1")
    assert (outcome.exit_code, outcome.reboot_required) == (code, True)
    assert f"exit code {code}" in outcome.message and "reboot required" in outcome.message
    assert read_receipt(layout, "hello") is not None


@pytest.mark.parametrize(("code", "meaning"), [(1603, "fatal error during installation"),
                                               (1618, "another installation is already in progress"),
                                               (1, "")])
def test_msi_failures_name_the_code(tmp_path: Path, msiexec: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                    code: int, meaning: str) -> None:
    layout = Layout(tmp_path / "agent")
    layout.create()
    msi = _msi_file(tmp_path)
    if code > 255:
        _windows_exit(layout, "op-1", "install", "1.0", code)
    else:
        monkeypatch.setenv("STANDIN_EXIT", str(code))
    with pytest.raises(InstallError) as caught:
        install(layout, "hello", "1.0", _msi(), msi, _ref(msi), "op-1")
    expected = f"exit code {code} ({meaning}): " if meaning else f"exit code {code}: "
    assert caught.value.message.startswith(expected) and caught.value.exit_code == code
    assert read_receipt(layout, "hello") is None and not layout.package_dir("hello", "1.0").exists()


def test_msi_declared_codes_extend_the_defaults(tmp_path: Path, msiexec: tuple[Path, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    layout = Layout(tmp_path / "agent")
    layout.create()
    msi = _msi_file(tmp_path)
    spec = _msi(successExitCodes=[1638, 2], rebootExitCodes=[1])
    _windows_exit(layout, "op-1", "install", "1.0", 1638)
    assert install(layout, "hello", "1.0", spec, msi, _ref(msi), "op-1").exit_code == 1638
    monkeypatch.setenv("STANDIN_EXIT", "2")  # a real run of the stand-in
    assert install(layout, "hello", "1.0", spec, msi, _ref(msi), "op-2").exit_code == 2
    monkeypatch.setenv("STANDIN_EXIT", "1")
    assert install(layout, "hello", "1.0", spec, msi, _ref(msi), "op-3").reboot_required
    _windows_exit(layout, "op-4", "install", "1.0", 3010)
    assert install(layout, "hello", "1.0", spec, msi, _ref(msi), "op-4").reboot_required
    monkeypatch.setenv("STANDIN_EXIT", "3")
    with pytest.raises(InstallError, match="^exit code 3: stand-in ran"):
        install(layout, "hello", "1.0", spec, msi, _ref(msi), "op-5")


def test_msi_uninstall_from_the_receipt(tmp_path: Path, msiexec: tuple[Path, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    tool, calls = msiexec
    layout = Layout(tmp_path / "agent")
    layout.create()
    msi = _msi_file(tmp_path)
    install(layout, "hello", "1.0", _msi(), msi, _ref(msi), "op-1")

    monkeypatch.setenv("STANDIN_EXIT", "1")  # a real run of the stand-in: argv recorded
    with pytest.raises(InstallError, match=r"^uninstalling hello 1\.0: exit code 1: stand-in ran"):
        uninstall(layout, "hello", None, "op-2")
    log_file = layout.installer_log("hello", "1.0", "uninstall")
    assert _calls(calls)[-1] == [str(tool), "/x", PRODUCT, "/qn", "/norestart", "/l*v", str(log_file)]
    _windows_exit(layout, "op-3", "uninstall", "1.0", 1603)
    with pytest.raises(InstallError, match=r"^uninstalling hello 1\.0: exit code 1603 \(fatal error"):
        uninstall(layout, "hello", None, "op-3")
    assert read_receipt(layout, "hello") is not None  # still installed as far as anyone knows

    _windows_exit(layout, "op-4", "uninstall", "1.0", 3010)
    outcome = uninstall(layout, "hello", None, "op-4")
    assert outcome.reboot_required and outcome.exit_code == 3010 and read_receipt(layout, "hello") is None

    monkeypatch.setenv("STANDIN_EXIT", "0")
    install(layout, "hello", "1.0", _msi(), msi, _ref(msi), "op-5")
    assert uninstall(layout, "hello", None, "op-6") == Outcome(0, "stand-in ran")
    assert read_receipt(layout, "hello") is None


def test_msi_upgrade_removes_the_old_product_first(tmp_path: Path, msiexec: tuple[Path, Path]) -> None:
    """A new version of an msi package: msiexec /x of the old receipt's product code, then /i of the new file."""
    tool, calls = msiexec
    layout = Layout(tmp_path / "agent")
    layout.create()
    old, new = tmp_path / "Hello-1.0.msi", tmp_path / "Hello-2.0.msi"
    old.write_bytes(b"msi 1.0")
    new.write_bytes(b"msi 2.0")
    new_code = "{11111111-2222-3333-4444-555555555555}"
    install(layout, "hello", "1.0", _msi(), old, _ref(old), "op-1")
    install(layout, "hello", "2.0", _msi(productCode=new_code), new, _ref(new), "op-2")
    verbs = [(call[1], call[2]) for call in _calls(calls)]
    assert verbs == [("/i", str(layout.package_dir("hello", "1.0") / old.name)), ("/x", PRODUCT),
                     ("/i", str(layout.package_dir("hello", "2.0") / new.name))]
    receipt = read_receipt(layout, "hello")
    assert receipt is not None and receipt.version == "2.0" and receipt.installer.product_code == new_code
    assert not layout.package_dir("hello", "1.0").exists()


def test_msi_uninstall_of_a_product_already_gone_succeeds(tmp_path: Path, msiexec: tuple[Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    layout = Layout(tmp_path / "agent")
    layout.create()
    msi = _msi_file(tmp_path)
    install(layout, "hello", "1.0", _msi(), msi, _ref(msi), "op-1")
    _windows_exit(layout, "op-2", "uninstall", "1.0", 1605)
    outcome = uninstall(layout, "hello", None, "op-2")
    assert outcome.exit_code == 1605 and "this product is not installed" in outcome.message
    assert read_receipt(layout, "hello") is None
    # 1605 is success only for an uninstall
    _windows_exit(layout, "op-3", "install", "1.0", 1605)
    with pytest.raises(InstallError, match=r"^exit code 1605 \(this product is not installed\)"):
        install(layout, "hello", "1.0", _msi(), msi, _ref(msi), "op-3")


def test_msi_without_msiexec_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    layout = Layout(tmp_path / "agent")
    layout.create()
    msi = _msi_file(tmp_path)
    with pytest.raises(InstallError, match="msiexec is not on PATH"):
        install(layout, "hello", "1.0", _msi(), msi, _ref(msi), "op-1")
    assert read_receipt(layout, "hello") is None


def test_msi_reboot_reaches_the_result_through_run_action(tmp_path: Path, msiexec: tuple[Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from reconciler.agent.agent import Agent

    agent = Agent("pc-msi-1", "http://127.0.0.1:9", tmp_path / "agent", insecure_http=True)
    _windows_exit(agent.layout, "op-msi-1", "install", "1.0", 3010)
    msi = _msi_file(tmp_path)
    ref = _ref(msi)
    shutil.copyfile(msi, agent.layout.cached_artifact(ref.sha256))
    action = {"operationId": "op-msi-1", "job": "hello", "action": "install",
              "package": {"name": "hello", "version": "1.0"}, "previousVersion": None,
              "artifact": ref.to_dict() | {"size": ref.size},
              "installer": {"type": "msi", "install": [], "uninstall": [], "detect": [], "timeoutSeconds": 120,
                            "productCode": PRODUCT}}
    result = agent.run_action(action)
    assert result is not None and result["status"] == "succeeded" and result["exitCode"] == 3010
    assert result["rebootRequired"] is True


def test_msi_presence_reads_the_uninstall_key(tmp_path: Path) -> None:
    registry = {(rf"SOFTWARE\WOW6432Node\Microsoft\Windows\CurrentVersion\Uninstall\{PRODUCT}",
                 "DisplayVersion"): "1.0.4"}

    def reader(key: str, value: str) -> str | None:
        return registry.get((key, value))

    assert native.msi_installed_version(PRODUCT, reader) == "1.0.4"
    assert native.msi_installed_version("{00000000-0000-0000-0000-000000000000}", reader) is None
    if sys.platform != "win32":
        assert native.msi_installed_version(PRODUCT) is None  # no registry, no msi product
    layout = Layout(tmp_path / "agent", registry=reader)
    layout.create()
    receipt_installer = _msi()
    from reconciler.agent.installers import Receipt, write_receipt
    write_receipt(layout, Receipt("hello", "1.0", receipt_installer, "op-1", "2026-01-01T00:00:00Z"))
    assert inventory(layout) == [{"name": "hello", "version": "1.0"}]
    registry.clear()
    assert inventory(layout) == []


def _exe_file(tmp_path: Path, calls: Path) -> Path:
    return _standin(tmp_path / "HelloSetup.exe", calls)


def test_exe_runs_the_artifact_with_its_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.name == "nt":
        pytest.skip("the .exe stand-in is a POSIX script")
    calls = tmp_path / "exe-calls.jsonl"
    exe = _exe_file(tmp_path, calls)
    exe.chmod(0o644)  # as downloaded: not executable; the agent makes its copy executable
    uninstaller = _standin(tmp_path / "uninst", calls)
    layout = Layout(tmp_path / "agent")
    layout.create()
    spec = InstallerSpec.from_dict({"type": "exe", "install": ["/S", "/D=${PACKAGE_DIR}"],
                                    "uninstall": [str(uninstaller), "/S"], "successExitCodes": [0, 2],
                                    "rebootExitCodes": [194]})
    outcome = install(layout, "hello", "1.0", spec, exe, _ref(exe), "op-1")
    target = layout.package_dir("hello", "1.0")
    assert _calls(calls) == [[str(target / exe.name), "/S", f"/D={target}"]]
    assert outcome.exit_code == 0 and stat.S_IMODE((target / exe.name).stat().st_mode) & 0o100
    monkeypatch.setenv("STANDIN_EXIT", "2")
    assert install(layout, "hello", "1.0", spec, exe, _ref(exe), "op-2").exit_code == 2
    monkeypatch.setenv("STANDIN_EXIT", "194")
    assert install(layout, "hello", "1.0", spec, exe, _ref(exe), "op-3").reboot_required
    monkeypatch.setenv("STANDIN_EXIT", "1")  # neither declared: a failure, named by its code only
    with pytest.raises(InstallError, match=r"^exit code 1: stand-in ran"):
        install(layout, "hello", "1.0", spec, exe, _ref(exe), "op-4")
    assert read_receipt(layout, "hello") is None
    monkeypatch.setenv("STANDIN_EXIT", "0")
    install(layout, "hello", "1.0", spec, exe, _ref(exe), "op-5")
    monkeypatch.setenv("STANDIN_EXIT", "194")
    outcome = uninstall(layout, "hello", None, "op-6")
    assert outcome.reboot_required and _calls(calls)[-1] == [str(uninstaller), "/S"]


def test_command_declared_exit_codes(tmp_path: Path) -> None:
    """``command`` with successExitCodes/rebootExitCodes, through install()."""
    layout = Layout(tmp_path / "agent")
    layout.create()
    blob = tmp_path / "run.py"
    blob.write_text("import sys\nsys.exit(int(sys.argv[1]))\n")
    ref = _ref(blob)

    def spec(code: int) -> InstallerSpec:
        return InstallerSpec.from_dict({"type": "command", "install": ["${PYTHON}", "run.py", str(code)],
                                        "uninstall": ["${PYTHON}", "run.py", "0"], "successExitCodes": [0, 5],
                                        "rebootExitCodes": [7]})

    assert install(layout, "c", "1", spec(5), blob, ref, "op-1").exit_code == 5
    rebooting = install(layout, "c", "1", spec(7), blob, ref, "op-2")
    assert rebooting.reboot_required and rebooting.exit_code == 7
    with pytest.raises(InstallError, match=r"^exit code 6: "):
        install(layout, "c", "1", spec(6), blob, ref, "op-3")
    default = InstallerSpec.from_dict({"type": "command", "install": ["${PYTHON}", "run.py", "7"],
                                       "uninstall": ["true"]})
    with pytest.raises(InstallError, match=r"^exit code 7: "):
        install(layout, "c", "1", default, blob, ref, "op-4")


@pytest.mark.parametrize(("installer", "problem"), [
    ({"type": "msi"}, "msi installer has no productCode"),
    ({"type": "msi", "productCode": "{8a1f3c2d-1b2c-4d5e-8f90-a1b2c3d4e5f6}"}, "invalid productCode"),
    ({"type": "msi", "productCode": PRODUCT, "properties": {"lower": "x"}}, "not a public property name"),
    ({"type": "msi", "productCode": PRODUCT, "properties": {"A": 'x" /x'}}, "without quotes"),
    ({"type": "deb"}, "deb installer has no packageName"),
    ({"type": "deb", "packageName": "../etc"}, "invalid packageName"),
    ({"type": "command", "install": ["x"], "successExitCodes": [0], "rebootExitCodes": [0]}, "both success"),
    ({"type": "command", "install": ["x"], "successExitCodes": [-1]}, "is not an exit code"),
    ({"type": "command", "install": ["x"], "successExitCodes": list(range(33))}, "at most 32"),
    ({"type": "msi", "productCode": PRODUCT, "rebootExitCodes": [0]}, "both success"),
    ({"type": "appx"}, "unknown installer type"),
])
def test_agent_refuses_malformed_native_installers(installer: dict[str, Any], problem: str) -> None:
    with pytest.raises(InstallError, match=problem):
        InstallerSpec.from_dict(installer)


def test_native_installer_needs_a_file_artifact(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "agent")
    layout.create()
    tar = tmp_path / "a.tar"
    tar.write_bytes(b"")
    with pytest.raises(InstallError, match="needs a single-file artifact"):
        install(layout, "hello", "1.0", _msi(), tar, ArtifactRef(_sha(tar), "tar"), "op-1")


# ------------------------------------------------------------------ the verifier


MSI_SHA = hashlib.sha256(b"hello msi").hexdigest()
DEB_SHA = hashlib.sha256(b"hello deb").hexdigest()
VERIFY_DOCUMENTS = {
    "jobs/install-hello.yaml": """\
apiVersion: reconciler/v1
kind: Job
metadata: {name: install-hello}
spec:
  jobType: install
  package: {name: hello, version: "1.0"}
  destinationType: allLowerClients
  destinations: [relay-a]
""",
    "jobs/install-hello-deb.yaml": """\
apiVersion: reconciler/v1
kind: Job
metadata: {name: install-hello-deb}
spec:
  jobType: install
  package: {name: hello-deb, version: "1.0"}
  destinationType: allLowerClients
  destinations: [relay-a]
""",
    "packages/hello-1.0.yaml": f"""\
apiVersion: reconciler/v1
kind: Package
metadata: {{name: hello-1.0}}
spec:
  name: hello
  version: "1.0"
  artifact: {{url: "https://downloads.example.invalid/Hello-1.0.msi", sha256: "{MSI_SHA}"}}
  installer:
    type: msi
    productCode: "{PRODUCT}"
    properties: {{INSTALLDIR: 'C:\\Hello', ALLUSERS: "1"}}
    successExitCodes: [1638]
    rebootExitCodes: [1]
""",
    "packages/hello-deb-1.0.yaml": f"""\
apiVersion: reconciler/v1
kind: Package
metadata: {{name: hello-deb-1.0}}
spec:
  name: hello-deb
  version: "1.0"
  artifact: {{url: "https://downloads.example.invalid/hello_1.0_all.deb", sha256: "{DEB_SHA}"}}
  installer: {{type: deb, packageName: hello}}
""",
}


def _signed_action(kind: str) -> dict[str, Any]:
    """The install action a relay hands out for the msi or deb package above."""
    if kind == "msi":
        return {"operationId": "op-1", "job": "install-hello", "action": "install",
                "package": {"name": "hello", "version": "1.0"}, "previousVersion": None,
                "artifact": {"sha256": MSI_SHA, "size": 9, "format": "file", "fileName": "Hello-1.0.msi"},
                "installer": {"type": "msi", "install": [], "uninstall": [], "detect": [], "timeoutSeconds": 600,
                              "successExitCodes": [1638], "rebootExitCodes": [1], "productCode": PRODUCT,
                              "properties": {"INSTALLDIR": "C:\\Hello", "ALLUSERS": "1"}},
                "documents": {"job": "jobs/install-hello.yaml", "package": "packages/hello-1.0.yaml"}}
    return {"operationId": "op-2", "job": "install-hello-deb", "action": "install",
            "package": {"name": "hello-deb", "version": "1.0"}, "previousVersion": None,
            "artifact": {"sha256": DEB_SHA, "size": 9, "format": "file", "fileName": "hello_1.0_all.deb"},
            "installer": {"type": "deb", "install": [], "uninstall": [], "detect": [], "timeoutSeconds": 600,
                          "packageName": "hello"},
            "documents": {"job": "jobs/install-hello-deb.yaml", "package": "packages/hello-deb-1.0.yaml"}}


@pytest.mark.parametrize(("kind", "field", "value"), [
    ("msi", "productCode", "{00000000-0000-0000-0000-000000000000}"),
    ("msi", "properties", {"INSTALLDIR": "C:\\Hello", "ALLUSERS": "1", "EXTRA": "x"}),
    ("msi", "successExitCodes", [1638, 1603]),
    ("msi", "rebootExitCodes", None),
    ("deb", "packageName", "bash"),
    ("deb", "successExitCodes", [0, 1]),
])
def test_verifier_refuses_a_changed_native_installer_field(tmp_path: Path, kind: str, field: str,
                                                           value: Any) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from reconciler.agent.verify import Verifier
    from reconciler.signing import Manifest, document_digest, sign

    key = Ed25519PrivateKey.generate()
    signed = Manifest(serial=1, commit="c0ffee" + "0" * 34, issued_at="2026-11-30T12:00:00Z",
                      headquarters="hq-x", relays={"relay-a": "hq-x"},
                      documents={path: document_digest(text.encode()) for path, text in VERIFY_DOCUMENTS.items()})
    envelope = sign(signed, [key])
    verifier = Verifier([key.public_key()], tmp_path, "pc-1")

    def reply(*actions: dict[str, Any]) -> dict[str, Any]:
        return {"pollSeconds": 30, "relay": "relay-a", "actions": list(actions), "manifest": envelope,
                "documents": dict(VERIFY_DOCUMENTS)}

    honest = _signed_action(kind)
    assert verifier.refusals(reply(honest), "http://127.0.0.1:8080") == {}
    tampered = _signed_action(kind)
    if value is None:
        del tampered["installer"][field]
    else:
        tampered["installer"][field] = value
    refused = verifier.refusals(reply(tampered), "http://127.0.0.1:8080")
    assert list(refused) == [0] and f"installer is not the package document's ({field} differ)" in refused[0]


# ------------------------------------------------------------------ the example repo's packages


EXAMPLE = Path(__file__).resolve().parent.parent / "example-repo"


@pytest.mark.parametrize("kind", ["deb", "rpm"])
def test_example_repo_native_packages_install_in_a_sandbox(tmp_path: Path, kind: str) -> None:
    """The committed .deb and .rpm are what their specs say (name, version), and install and remove."""
    if shutil.which("dpkg-deb" if kind == "deb" else "rpm") is None:
        pytest.skip(f"{kind} tools are not installed")
    from reconciler import protocol
    from reconciler.repo_tree import load_repo

    specs = load_repo(EXAMPLE).specs
    assert specs is not None
    (package,) = [p for p in specs.packages if p.name == f"acme-motd-{kind}"]
    assert package.artifact.path is not None
    artifact = EXAMPLE / package.artifact.path
    installer = InstallerSpec.from_dict(dict(protocol.installer_of(package.installer)))
    sandbox = tmp_path / "sandbox"
    layout = Layout(tmp_path / "agent", dpkg_root=sandbox if kind == "deb" else None,
                    rpm_root=sandbox if kind == "rpm" else None)
    layout.create()
    install(layout, package.name, package.version, installer, artifact, _ref(artifact), "op-1")
    assert (sandbox / "usr/share/acme-motd/banner.txt").read_text().startswith("Authorised use only.")
    assert inventory(layout) == [{"name": package.name, "version": package.version}]
    uninstall(layout, package.name, None, "op-2")
    assert inventory(layout) == [] and not (sandbox / "usr/share/acme-motd/banner.txt").exists()
