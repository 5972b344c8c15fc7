"""Installers on a real temp directory: archive safety, the file format, commands, receipts."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from reconciler.agent.installers import (
    ArtifactRef,
    InstallError,
    InstallerSpec,
    Layout,
    UnsafeArchiveError,
    install,
    inventory,
    read_receipt,
    uninstall,
)

PY = "${PYTHON}"


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", size: int = 0,
          mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = size
    info.mode = mode
    return info


def build_tar(path: Path, *members: tuple[str, str | bytes] | tarfile.TarInfo) -> tuple[Path, ArtifactRef]:
    """A tar at ``path`` from ``(name, content)`` files and ready-made TarInfo entries (links, devices)."""
    with tarfile.open(path, "w") as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
                continue
            name, content = member
            data = content.encode() if isinstance(content, str) else content
            archive.addfile(_info(name, size=len(data), mode=0o755 if name.endswith(".sh") else 0o644),
                            io.BytesIO(data))
    return path, ArtifactRef(hashlib.sha256(path.read_bytes()).hexdigest(), "tar", path.stat().st_size)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    result = Layout(tmp_path / "root")
    result.create()
    return result


FILES = InstallerSpec("files")


def command(install_argv: list[str], uninstall_argv: list[str] | None = None, timeout: float = 60,
            detect: list[str] | None = None) -> InstallerSpec:
    return InstallerSpec.from_dict({"type": "command", "install": install_argv, "uninstall": uninstall_argv or [],
                                    "detect": detect or [], "timeoutSeconds": timeout})


def test_files_installer_unpacks_and_writes_receipt(layout: Layout, tmp_path: Path) -> None:
    tar, ref = build_tar(tmp_path / "a.tar", _info("bin", tarfile.DIRTYPE, mode=0o755), ("bin/tool.sh", "echo hi\n"),
                         ("README", "read me"), _info("latest", tarfile.SYMTYPE, "bin/tool.sh"),
                         _info("sub/up", tarfile.SYMTYPE, "../README"))
    outcome = install(layout, "tool", "1.0", FILES, tar, ref, "op-1")
    target = layout.package_dir("tool", "1.0")
    assert outcome.exit_code == 0 and "installed tool 1.0" in outcome.message
    assert (target / "README").read_text() == "read me"
    assert (target / "bin" / "tool.sh").read_text() == "echo hi\n"
    assert (target / "latest").read_text() == "echo hi\n"
    assert (target / "sub" / "up").read_text() == "read me"
    receipt = json.loads(layout.receipt("tool").read_text())
    assert receipt["name"] == "tool" and receipt["version"] == "1.0" and receipt["operationId"] == "op-1"
    assert receipt["installer"]["type"] == "files" and receipt["installedAt"].endswith("Z")
    assert inventory(layout) == [{"name": "tool", "version": "1.0"}]
    assert [p.name for p in (layout.packages / "tool").iterdir()] == ["1.0"]  # no staging left


Member = tuple[str, str] | tarfile.TarInfo

ESCAPES: dict[str, tuple[Member, ...]] = {
    "zip-slip": (("../evil", "x"),),
    "zip-slip-nested": (("a/../../evil", "x"),),
    "absolute": (("/etc/x", "x"),),
    "symlink-escape": (_info("link", tarfile.SYMTYPE, "../../outside"),),
    "symlink-absolute": (_info("link", tarfile.SYMTYPE, "/etc"),),
    "write-through-symlink": (_info("link", tarfile.SYMTYPE, "sub"), ("link/file", "x")),
    "hardlink-escape": (_info("hl", tarfile.LNKTYPE, "../../outside"),),
    "device": (_info("dev", tarfile.CHRTYPE),),
    "fifo": (_info("pipe", tarfile.FIFOTYPE),),
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_unsafe_archive_is_refused_and_nothing_installed(case: str, layout: Layout, tmp_path: Path) -> None:
    bad = ESCAPES[case]
    tar, ref = build_tar(tmp_path / "bad.tar", ("good.txt", "fine"), *bad)
    bad_name = bad[-1].name if isinstance(bad[-1], tarfile.TarInfo) else bad[-1][0]
    with pytest.raises(UnsafeArchiveError) as caught:
        install(layout, "pkg", "1.0", FILES, tar, ref, "op-bad")
    assert repr(bad_name) in caught.value.message
    assert caught.value.member == bad_name
    assert not layout.receipt("pkg").exists()
    assert list((layout.packages / "pkg").iterdir()) == []  # staging removed too
    assert not (tmp_path / "evil").exists() and not (layout.root / "evil").exists()


def test_refused_upgrade_keeps_the_installed_version(layout: Layout, tmp_path: Path) -> None:
    good, good_ref = build_tar(tmp_path / "good.tar", ("v1.txt", "1"))
    install(layout, "pkg", "1.0", FILES, good, good_ref, "op-1")
    bad, bad_ref = build_tar(tmp_path / "bad.tar", ("../evil", "x"))
    with pytest.raises(UnsafeArchiveError):
        install(layout, "pkg", "2.0", FILES, bad, bad_ref, "op-2")
    assert read_receipt(layout, "pkg").version == "1.0"  # type: ignore[union-attr]
    assert (layout.package_dir("pkg", "1.0") / "v1.txt").exists()


def test_garbage_artifact_fails_cleanly(layout: Layout, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 100)
    ref = ArtifactRef(hashlib.sha256(junk.read_bytes()).hexdigest())
    with pytest.raises(InstallError, match="not a valid tar archive"):
        install(layout, "pkg", "1.0", FILES, junk, ref, "op-1")
    assert list((layout.packages / "pkg").iterdir()) == []


def test_file_format_places_the_single_file(layout: Layout, tmp_path: Path) -> None:
    blob = tmp_path / "download"
    blob.write_bytes(b"MZ fake installer")
    ref = ArtifactRef.from_dict({"sha256": hashlib.sha256(blob.read_bytes()).hexdigest(), "format": "file",
                                 "fileName": "setup.exe", "size": blob.stat().st_size})
    install(layout, "app", "2.1", FILES, blob, ref, "op-1")
    assert (layout.package_dir("app", "2.1") / "setup.exe").read_bytes() == b"MZ fake installer"
    assert read_receipt(layout, "app").artifact["fileName"] == "setup.exe"  # type: ignore[union-attr]


@pytest.mark.parametrize("file_name", ["../x", "a/b", "a\\b", "..", "", "C:x", None])
def test_file_format_refuses_bad_file_names(file_name: str | None) -> None:
    with pytest.raises(InstallError, match="invalid fileName"):
        ArtifactRef.from_dict({"sha256": "a" * 64, "format": "file", "fileName": file_name})


@pytest.mark.parametrize("version", ["../1", "1/2", ".hidden", "", "a" * 200])
def test_unsafe_versions_are_refused(version: str, layout: Layout, tmp_path: Path) -> None:
    tar, ref = build_tar(tmp_path / "a.tar", ("f", "x"))
    with pytest.raises(InstallError, match="invalid package version"):
        install(layout, "pkg", version, FILES, tar, ref, "op-1")


INSTALL_SCRIPT = """\
import os, sys
root = os.environ["RECONCILER_ROOT"]
pkg = os.environ["RECONCILER_PACKAGE_DIR"]
assert os.path.samefile(os.getcwd(), pkg), (os.getcwd(), pkg)
assert sys.argv[1] == pkg, sys.argv
with open(os.path.join(root, "installed.log"), "a") as f:
    f.write(os.environ["RECONCILER_PACKAGE_VERSION"] + "\\n")
print("installing from", pkg)
print("done")
"""

UNINSTALL_SCRIPT = """\
import os
with open(os.path.join(os.environ["RECONCILER_ROOT"], "uninstalled.log"), "a") as f:
    f.write(os.environ["RECONCILER_PACKAGE_VERSION"] + "\\n")
print("removed")
"""


def _command_tar(tmp_path: Path, name: str = "cmd.tar", **scripts: str) -> tuple[Path, ArtifactRef]:
    return build_tar(tmp_path / name, ("install.py", INSTALL_SCRIPT), ("uninstall.py", UNINSTALL_SCRIPT),
                     *[(f"{k}.py", v) for k, v in scripts.items()])


def test_command_installer_success_substitutes_placeholders(layout: Layout, tmp_path: Path) -> None:
    tar, ref = _command_tar(tmp_path)
    spec = command([PY, "install.py", "${PACKAGE_DIR}"], [PY, "${PACKAGE_DIR}/uninstall.py"])
    outcome = install(layout, "app", "1.0", spec, tar, ref, "op-1")
    assert outcome.exit_code == 0
    assert outcome.message.endswith("done") and "installing from" in outcome.message
    assert (layout.root / "installed.log").read_text() == "1.0\n"
    receipt = read_receipt(layout, "app")
    assert receipt is not None and receipt.installer.install == (PY, "install.py", "${PACKAGE_DIR}")
    assert layout.package_dir("app", "1.0").is_dir()  # kept for uninstall


def test_command_installer_failure_reports_exit_code_and_tail(layout: Layout, tmp_path: Path) -> None:
    script = "import sys\nfor i in range(2000):\n    print('line', i)\nprint('fatal: disk on fire')\nsys.exit(3)\n"
    tar, ref = build_tar(tmp_path / "f.tar", ("fail.py", script))
    with pytest.raises(InstallError) as caught:
        install(layout, "app", "1.0", command([PY, "fail.py"]), tar, ref, "op-1")
    message = caught.value.message
    assert message.startswith("exit code 3: ")
    assert message.endswith("fatal: disk on fire")
    assert "line 0\n" not in message and len(message) < 2100  # only the tail
    assert caught.value.exit_code == 3
    assert read_receipt(layout, "app") is None
    assert not layout.package_dir("app", "1.0").exists()


def test_command_installer_timeout_kills_and_fails(layout: Layout, tmp_path: Path) -> None:
    script = "import time\nprint('starting', flush=True)\ntime.sleep(30)\n"
    tar, ref = build_tar(tmp_path / "s.tar", ("slow.py", script))
    with pytest.raises(InstallError) as caught:
        install(layout, "slow", "1.0", command([PY, "slow.py"], timeout=1), tar, ref, "op-1")
    assert caught.value.message.startswith("timed out after 1 s")
    assert "starting" in caught.value.message
    assert read_receipt(layout, "slow") is None and not layout.package_dir("slow", "1.0").exists()


def test_command_that_cannot_start_fails_with_a_message(layout: Layout, tmp_path: Path) -> None:
    tar, ref = build_tar(tmp_path / "n.tar", ("x", "x"))
    with pytest.raises(InstallError, match="cannot run"):
        install(layout, "app", "1.0", command(["/nonexistent/installer-binary"]), tar, ref, "op-1")
    assert read_receipt(layout, "app") is None


def test_uninstall_files_removes_directory_and_receipt(layout: Layout, tmp_path: Path) -> None:
    tar, ref = build_tar(tmp_path / "a.tar", ("f", "x"))
    install(layout, "pkg", "1.0", FILES, tar, ref, "op-1")
    outcome = uninstall(layout, "pkg", None, "op-2")
    assert outcome.message == "uninstalled pkg 1.0"
    assert read_receipt(layout, "pkg") is None and not (layout.packages / "pkg").exists()
    assert inventory(layout) == []
    assert uninstall(layout, "pkg", None, "op-3").message == "not installed"


def test_uninstall_of_another_version_leaves_the_installed_one(layout: Layout, tmp_path: Path) -> None:
    tar, ref = build_tar(tmp_path / "a.tar", ("f", "x"))
    install(layout, "pkg", "2.0", FILES, tar, ref, "op-1")
    assert uninstall(layout, "pkg", "1.0", "op-2").message == "not installed (2.0 present)"
    assert read_receipt(layout, "pkg") is not None


def test_uninstall_command_runs_uninstall_in_package_dir(layout: Layout, tmp_path: Path) -> None:
    tar, ref = _command_tar(tmp_path)
    install(layout, "app", "1.0", command([PY, "install.py", "${PACKAGE_DIR}"], [PY, "uninstall.py"]),
            tar, ref, "op-1")
    outcome = uninstall(layout, "app", "1.0", "op-2")
    assert outcome.message == "removed"
    assert (layout.root / "uninstalled.log").read_text() == "1.0\n"
    assert not layout.package_dir("app", "1.0").exists() and read_receipt(layout, "app") is None


def test_failed_uninstall_command_keeps_receipt(layout: Layout, tmp_path: Path) -> None:
    tar, ref = _command_tar(tmp_path)
    install(layout, "app", "1.0", command([PY, "install.py", "${PACKAGE_DIR}"], [PY, "-c", "raise SystemExit(5)"]),
            tar, ref, "op-1")
    with pytest.raises(InstallError, match=r"^uninstalling app 1.0: exit code 5"):
        uninstall(layout, "app", None, "op-2")
    assert read_receipt(layout, "app") is not None


def test_upgrade_files_replaces_old_version(layout: Layout, tmp_path: Path) -> None:
    v1, r1 = build_tar(tmp_path / "1.tar", ("v", "1"))
    v2, r2 = build_tar(tmp_path / "2.tar", ("v", "2"))
    install(layout, "pkg", "1.0", FILES, v1, r1, "op-1")
    install(layout, "pkg", "2.0", FILES, v2, r2, "op-2")
    assert not layout.package_dir("pkg", "1.0").exists()
    assert (layout.package_dir("pkg", "2.0") / "v").read_text() == "2"
    assert inventory(layout) == [{"name": "pkg", "version": "2.0"}]
    # downgrade back works the same way
    install(layout, "pkg", "1.0", FILES, v1, r1, "op-3")
    assert sorted(p.name for p in (layout.packages / "pkg").iterdir()) == ["1.0"]


def test_upgrade_command_uninstalls_previous_then_installs(layout: Layout, tmp_path: Path) -> None:
    spec = command([PY, "install.py", "${PACKAGE_DIR}"], [PY, "uninstall.py"])
    v1, r1 = _command_tar(tmp_path, "1.tar")
    v2, r2 = _command_tar(tmp_path, "2.tar", extra="# v2\n")
    install(layout, "app", "1.0", spec, v1, r1, "op-1")
    install(layout, "app", "2.0", spec, v2, r2, "op-2")
    assert (layout.root / "uninstalled.log").read_text() == "1.0\n"
    assert (layout.root / "installed.log").read_text() == "1.0\n2.0\n"
    assert not layout.package_dir("app", "1.0").exists()
    assert (layout.package_dir("app", "2.0") / "extra.py").exists()


def test_reinstall_same_version_replaces_tree(layout: Layout, tmp_path: Path) -> None:
    tar, ref = build_tar(tmp_path / "a.tar", ("f", "x"))
    install(layout, "pkg", "1.0", FILES, tar, ref, "op-1")
    (layout.package_dir("pkg", "1.0") / "f").unlink()
    (layout.package_dir("pkg", "1.0") / "junk").write_text("local change")
    install(layout, "pkg", "1.0", FILES, tar, ref, "op-2")
    assert sorted(p.name for p in layout.package_dir("pkg", "1.0").iterdir()) == ["f"]


def test_stale_staging_from_a_crash_is_swept(layout: Layout, tmp_path: Path) -> None:
    stale = layout.packages / "pkg" / ".staging-op-old"
    stale.mkdir(parents=True)
    (stale / "half").write_text("x")
    tar, ref = build_tar(tmp_path / "a.tar", ("f", "x"))
    install(layout, "pkg", "1.0", FILES, tar, ref, "op-1")
    assert sorted(p.name for p in (layout.packages / "pkg").iterdir()) == ["1.0"]


def test_inventory_reports_drift(layout: Layout, tmp_path: Path) -> None:
    tar, ref = build_tar(tmp_path / "a.tar", ("f", "x"))
    install(layout, "gone", "1.0", FILES, tar, ref, "op-1")
    marker = layout.root / "present.flag"
    detect = [PY, "-c", f"import os, sys; sys.exit(0 if os.path.exists({str(marker)!r}) else 1)"]
    install(layout, "detected", "1.0", command([PY, "-c", "pass"], detect=detect), tar, ref, "op-2")
    marker.write_text("yes")
    assert inventory(layout) == [{"name": "detected", "version": "1.0"}, {"name": "gone", "version": "1.0"}]
    shutil.rmtree(layout.package_dir("gone", "1.0"))
    marker.unlink()
    assert inventory(layout) == []


def test_corrupt_receipt_counts_as_absent(layout: Layout) -> None:
    layout.receipt("pkg").write_text("{ not json")
    assert inventory(layout) == []
    assert (layout.receipts / "pkg.json.corrupt").exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_file_format_is_executable(layout: Layout, tmp_path: Path) -> None:
    blob = tmp_path / "run.sh"
    blob.write_text("#!/bin/sh\necho from-file-artifact\n")
    ref = ArtifactRef.from_dict({"sha256": hashlib.sha256(blob.read_bytes()).hexdigest(), "format": "file",
                                 "fileName": "run.sh"})
    outcome = install(layout, "sh", "1", command(["./run.sh"]), blob, ref, "op-1")
    assert outcome.message == "from-file-artifact"


def test_command_sees_client_identity_and_platform_facts(tmp_path: Path) -> None:
    """Installer scripts can branch on the client's reported os/arch (overrides included)."""
    from reconciler.agent.agent import Agent

    agent = Agent("pc-env-001", "http://127.0.0.1:9", tmp_path / "root",
                  fact_overrides=[("arch", "arm64"), ("os", "windows")], insecure_http=True)
    env = dict(agent.layout.client_env)
    assert env == {"RECONCILER_ARCH": "arm64", "RECONCILER_CLIENT_ID": "pc-env-001", "RECONCILER_OS": "windows"}
    out = tmp_path / "env.txt"
    script = tmp_path / "show.py"
    script.write_text(
        "import os\n"
        f"open({str(out)!r}, 'w').write(os.environ['RECONCILER_ARCH'] + ' ' + os.environ['RECONCILER_CLIENT_ID'])\n")
    from reconciler.agent.installers import run_command
    result = run_command(["${PYTHON}", str(script)], tmp_path, agent.layout, "x", "1", 10)
    assert out.read_text() == "arm64 pc-env-001", result
