"""Real package databases in temp directories: dpkg and rpm install into a sandbox root, never the machine's.

``DpkgSandbox`` builds tiny ``.deb`` files with ``dpkg-deb --build`` and
installs or removes them with the real ``dpkg --root DIR --admindir
DIR/var/lib/dpkg``; ``RpmSandbox`` builds ``.rpm`` files with ``rpmbuild``
and installs them with ``rpm --root DIR --dbpath /var/lib/rpm`` (the agent's ``--rpm-root``). The collectors of
:mod:`reconciler.agent.software` are then pointed at the sandbox.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

SYSTEM_DPKG_STATUS = Path("/var/lib/dpkg/status")


def _run(*argv: str) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
    return proc.stdout


def system_dpkg_fingerprint() -> str | None:
    """SHA-256 of the machine's dpkg status file (a test asserts it never changes)."""
    return hashlib.sha256(SYSTEM_DPKG_STATUS.read_bytes()).hexdigest() if SYSTEM_DPKG_STATUS.is_file() else None


class DpkgSandbox:
    """A dpkg root and database under ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.admindir = self.root / "var" / "lib" / "dpkg"
        for sub in ("info", "updates", "triggers"):
            (self.admindir / sub).mkdir(parents=True, exist_ok=True)
        for name in ("status", "available"):
            (self.admindir / name).touch()
        self.log = base / "dpkg.log"

    def build(self, name: str, version: str, *, conffile: bool = False) -> Path:
        """A ``.deb`` of ``name`` ``version`` (with a conffile: removing it leaves ``config-files``)."""
        tree = self.base / "build" / f"{name}-{version}"
        (tree / "DEBIAN").mkdir(parents=True, exist_ok=True)
        (tree / "DEBIAN" / "control").write_text(
            f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: Test <test@example.invalid>\n"
            f"Description: sandbox package {name}\n", encoding="utf-8")
        (tree / "usr" / "share" / name).mkdir(parents=True, exist_ok=True)
        (tree / "usr" / "share" / name / "README").write_text(f"{name} {version}\n", encoding="utf-8")
        if conffile:
            (tree / "etc").mkdir(exist_ok=True)
            (tree / "etc" / f"{name}.conf").write_text("setting = 1\n", encoding="utf-8")
            (tree / "DEBIAN" / "conffiles").write_text(f"/etc/{name}.conf\n", encoding="utf-8")
        deb = self.base / f"{name}_{version}_all.deb"
        _run("dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb))
        return deb

    def _dpkg(self, *args: str) -> str:
        return _run("dpkg", f"--root={self.root}", f"--admindir={self.admindir}", f"--log={self.log}",
                    "--force-not-root", *args)

    def install(self, name: str, version: str, *, conffile: bool = False) -> None:
        self._dpkg("--install", str(self.build(name, version, conffile=conffile)))

    def remove(self, name: str) -> None:
        self._dpkg("--remove", name)

    def status_of(self, name: str) -> str:
        return _run("dpkg-query", f"--admindir={self.admindir}", "-W", "-f=${db:Status-Status}", name)


class RpmSandbox:
    """An rpm root (its own database) under ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "rpmroot"
        self.root.mkdir(parents=True, exist_ok=True)
        _run("rpm", "--root", str(self.root), "--dbpath", "/var/lib/rpm", "--initdb")

    def install(self, name: str, version: str, release: str, epoch: int | None = None) -> None:
        top = self.base / "rpmbuild"
        (top / "SPECS").mkdir(parents=True, exist_ok=True)
        spec = top / "SPECS" / f"{name}.spec"
        spec.write_text(f"Name: {name}\nVersion: {version}\nRelease: {release}\n"
                        + (f"Epoch: {epoch}\n" if epoch is not None else "")
                        + "Summary: sandbox package\nLicense: MIT\nBuildArch: noarch\n%description\nsandbox\n%files\n",
                        encoding="utf-8")
        _run("rpmbuild", "--define", f"_topdir {top}", "--define", f"_rpmdir {top}/RPMS", "-bb", str(spec))
        built = next((top / "RPMS").rglob(f"{name}-{version}-{release}*.rpm"))
        _run("rpm", "--root", str(self.root), "--dbpath", "/var/lib/rpm", "--install", "--nodeps", str(built))


def have(*tools: str) -> bool:
    return all(shutil.which(tool) for tool in tools)
