"""The operating system's own package managers: Windows Installer, dpkg and rpm.

What ``installers.py`` runs for the native installer types (``msi``, ``exe``,
``deb``, ``rpm``; docs/INSTALLERS.md), kept here as plain functions:

* the argv of each install and uninstall command (:func:`msi_install_argv`,
  :func:`dpkg_install_argv`, ...), built from the spec's fields, never through
  a shell;
* what an exit code means (:data:`MSI_EXIT_MEANINGS`, :func:`exit_meaning`);
* presence and version queries that return the installed version or ``None``
  (:func:`msi_installed_version`, :func:`dpkg_installed_version`,
  :func:`rpm_installed_version`), so a detection module can use them as they
  are.

dpkg and rpm can be pointed at a sandbox root (the agent's ``--dpkg-root`` and
``--rpm-root``): every call then carries the options that keep it inside that
directory and its own package database. The Windows registry is read through
an injectable reader, so the msi queries run (and are tested) anywhere;
``winreg`` is imported only on Windows.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reconciler import names

QUERY_TIMEOUT_SECONDS = 60.0

# Windows Installer (msiexec) exit codes: https://learn.microsoft.com/windows/win32/msi/error-codes
MSI_SUCCESS_CODES = (0,)
MSI_REBOOT_CODES = (3010, 1641)
MSI_NOT_INSTALLED = 1605  # "This action is only valid for products that are currently installed."
MSI_EXIT_MEANINGS: Mapping[int, str] = {
    1601: "the Windows Installer service could not be accessed",
    1602: "the user cancelled the installation",
    1603: "fatal error during installation",
    1605: "this product is not installed",
    1618: "another installation is already in progress",
    1619: "the installation package could not be opened",
    1620: "the installation package could not be opened (not a valid package)",
    1624: "error applying transforms",
    1625: "the installation is forbidden by system policy",
    1633: "this installation package is not supported on this processor type",
    1638: "another version of this product is already installed",
    1639: "invalid command line argument",
    1641: "the installer has initiated a restart",
    3010: "a restart is required to complete the installation",
}

# The shapes of the spec's fields (reconciler.names, the schemas' patterns), matched with fullmatch.
MSI_PROPERTY = re.compile(names.MSI_PROPERTY)
PRODUCT_CODE = re.compile(names.MSI_PRODUCT_CODE)
DEB_PACKAGE_NAME = re.compile(names.DEB_PACKAGE_NAME)
RPM_PACKAGE_NAME = re.compile(names.PACKAGE_NAME)

UNINSTALL_KEYS = (
    r"SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall",
    r"SOFTWARE\WOW6432Node\Microsoft\Windows\CurrentVersion\Uninstall",
)

RegistryReader = Callable[[str, str], str | None]
"""``reader(key_path, value_name)`` under HKEY_LOCAL_MACHINE: the value as text, ``None`` when the key or
the value does not exist (``""`` names the key's default value)."""


class NativeToolMissing(Exception):
    """``msiexec``, ``dpkg`` or ``rpm`` is not on this machine's PATH."""


def exit_meaning(code: int, meanings: Mapping[int, str]) -> str:
    """``"exit code 1603 (fatal error during installation)"``, or just the code when ``meanings`` has none for it."""
    meaning = meanings.get(code)
    return f"exit code {code} ({meaning})" if meaning else f"exit code {code}"


def find_tool(name: str, env: Mapping[str, str] | None = None) -> str:
    """The absolute path of ``name`` on the PATH the installer commands get (``env``), or NativeToolMissing."""
    path = (env if env is not None else os.environ).get("PATH")
    found = shutil.which(name, path=path)
    if found is None:
        raise NativeToolMissing(f"{name} is not on PATH")
    return found


# ------------------------------------------------------------------ msi


def msi_install_argv(msiexec: str, package: Path, log: Path, properties: Sequence[tuple[str, str]]) -> list[str]:
    """``msiexec /i <file> /qn /norestart /l*v <log> PROP=value…``: silent, never restarting by itself."""
    return [msiexec, "/i", str(package), "/qn", "/norestart", "/l*v", str(log),
            *(f"{name}={value}" for name, value in properties)]


def msi_uninstall_argv(msiexec: str, product_code: str, log: Path) -> list[str]:
    """``msiexec /x <productCode> /qn /norestart /l*v <log>``: no .msi file is needed to remove a product."""
    return [msiexec, "/x", product_code, "/qn", "/norestart", "/l*v", str(log)]


def windows_registry_reader() -> RegistryReader:  # pragma: no cover - Windows only
    """A :data:`RegistryReader` over the real HKEY_LOCAL_MACHINE (64-bit view, as the keys name WOW6432Node)."""
    if sys.platform != "win32":
        raise OSError("the Windows registry exists only on Windows")
    import winreg

    def read(key_path: str, value_name: str) -> str | None:
        try:
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, key_path, 0,
                                winreg.KEY_READ | winreg.KEY_WOW64_64KEY) as key:
                value, _kind = winreg.QueryValueEx(key, value_name)
        except OSError:
            return None
        return str(value)

    return read


def msi_installed_version(product_code: str, reader: RegistryReader | None = None) -> str | None:
    """The ``DisplayVersion`` of an installed MSI product, ``""`` if it has none, ``None`` if not installed.

    Presence is the product code's Uninstall key (native, then WOW6432Node for a
    32-bit product on 64-bit Windows). Without a ``reader``, the real registry
    on Windows; on any other system no MSI product can be installed.
    """
    if reader is None:
        if sys.platform != "win32":
            return None
        reader = windows_registry_reader()  # pragma: no cover - Windows only
    if not PRODUCT_CODE.fullmatch(product_code):
        return None
    for base in UNINSTALL_KEYS:
        key = f"{base}\\{product_code}"
        version = reader(key, "DisplayVersion")
        if version is not None:
            return version
        if reader(key, "") is not None or reader(key, "DisplayName") is not None:
            return ""  # the key exists without a version
    return None


# ------------------------------------------------------------------ dpkg


def dpkg_options(root: Path | None) -> list[str]:
    """What keeps dpkg inside a sandbox root: its database (``--root`` implies ``DIR/var/lib/dpkg``) and log, no root privileges needed,
    and maintainer scripts run without chroot (a sandbox has no shell of its own)."""
    if root is None:
        return []
    return [f"--root={root}", f"--log={root / 'var/log/dpkg.log'}", "--force-not-root", "--force-script-chrootless"]


def prepare_dpkg_root(root: Path) -> None:
    """Create the empty database a fresh sandbox root needs (``var/lib/dpkg/status``, ``updates``, ``info``)."""
    admin = root / "var/lib/dpkg"
    for directory in (admin / "updates", admin / "info", admin / "triggers", root / "var/log"):
        directory.mkdir(parents=True, exist_ok=True)
    (admin / "status").touch(exist_ok=True)
    (admin / "available").touch(exist_ok=True)


def dpkg_install_argv(dpkg: str, root: Path | None, package: Path) -> list[str]:
    """``dpkg -i <file>``: install, upgrade or downgrade alike (dpkg replaces whatever version is there)."""
    return [dpkg, *dpkg_options(root), "-i", str(package)]


def dpkg_uninstall_argv(dpkg: str, root: Path | None, package_name: str) -> list[str]:
    """``dpkg -r <name>``: remove the software, keep its configuration files (not ``--purge``)."""
    return [dpkg, *dpkg_options(root), "-r", package_name]


def deb_fields_argv(dpkg_deb: str, package: Path) -> list[str]:
    """``dpkg-deb --field <file> Package Version``: what a .deb is, read before anything is installed."""
    return [dpkg_deb, "--field", str(package), "Package", "Version"]


def dpkg_query_argv(dpkg_query: str, root: Path | None, package_name: str) -> list[str]:
    options = [f"--root={root}"] if root is not None else []
    return [dpkg_query, *options, "-W", "-f=${Status} ${Version}", package_name]


def parse_dpkg_status(output: str) -> str | None:
    """The version from ``${Status} ${Version}`` when the status is ``install ok installed``, else None."""
    words = output.strip().split()
    if len(words) == 4 and words[:3] == ["install", "ok", "installed"]:
        return words[3]
    return None


def parse_deb_fields(output: str) -> dict[str, str]:
    """``Package: x`` / ``Version: y`` lines as a mapping."""
    fields: dict[str, str] = {}
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep and key and not key.startswith((" ", "\t")):
            fields[key.strip()] = value.strip()
    return fields


# ------------------------------------------------------------------ rpm


def rpm_options(root: Path | None) -> list[str]:
    """``--root DIR --dbpath /var/lib/rpm``: the sandbox and its own database inside it (the distribution's
    default database path may be elsewhere, such as ``~/.rpmdb`` on Debian)."""
    return [] if root is None else ["--root", str(root), "--dbpath", "/var/lib/rpm"]


def rpm_install_argv(rpm: str, root: Path | None, package: Path) -> list[str]:
    """``rpm -U --oldpackage --replacepkgs <file>``: one command to upgrade, downgrade or reinstall."""
    return [rpm, *rpm_options(root), "-U", "--oldpackage", "--replacepkgs", str(package)]


def rpm_uninstall_argv(rpm: str, root: Path | None, package_name: str) -> list[str]:
    return [rpm, *rpm_options(root), "-e", package_name]


RPM_VERSION_FORMAT = "%{VERSION}-%{RELEASE}"


def rpm_query_argv(rpm: str, root: Path | None, package_name: str) -> list[str]:
    return [rpm, *rpm_options(root), "-q", "--qf", RPM_VERSION_FORMAT + r"\n", package_name]


def rpm_file_argv(rpm: str, package: Path) -> list[str]:
    """``rpm -qp --qf '%{NAME} %{VERSION}-%{RELEASE}' <file>``: what an .rpm is, before installing it."""
    return [rpm, "-qp", "--qf", "%{NAME} " + RPM_VERSION_FORMAT + r"\n", str(package)]


# ------------------------------------------------------------------ queries


@dataclass(frozen=True)
class Query:
    """How a query command ended: exit code and output (stdout and stderr together)."""

    exit_code: int
    output: str


def run_query(argv: Sequence[str], timeout: float = QUERY_TIMEOUT_SECONDS) -> Query:
    """Run a read-only query (no shell); OSError and TimeoutExpired are the caller's."""
    done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
    text = done.stdout.decode("utf-8", "replace")
    if done.returncode != 0:
        text += done.stderr.decode("utf-8", "replace")
    return Query(done.returncode, text)


def dpkg_installed_version(package_name: str, root: Path | None = None,
                           env: Mapping[str, str] | None = None) -> str | None:
    """The installed version of a Debian package (status ``install ok installed``), or None.

    A package removed but not purged (``deinstall ok config-files``) is not installed.
    """
    if root is not None and not (root / "var/lib/dpkg/status").is_file():
        return None
    try:
        result = run_query(dpkg_query_argv(find_tool("dpkg-query", env), root, package_name))
    except (NativeToolMissing, OSError, subprocess.TimeoutExpired):
        return None
    return parse_dpkg_status(result.output) if result.exit_code == 0 else None


def rpm_installed_version(package_name: str, root: Path | None = None,
                          env: Mapping[str, str] | None = None) -> str | None:
    """The installed ``VERSION-RELEASE`` of an rpm package, or None (several installed: the last listed)."""
    try:
        result = run_query(rpm_query_argv(find_tool("rpm", env), root, package_name))
    except (NativeToolMissing, OSError, subprocess.TimeoutExpired):
        return None
    if result.exit_code != 0:
        return None
    lines = [line.strip() for line in result.output.splitlines() if line.strip()]
    return lines[-1] if lines else None


# ------------------------------------------------------------------ content drift


def dpkg_verify_argv(dpkg: str, root: Path | None, package_name: str) -> list[str]:
    """``dpkg --verify <name>``: every file of the package checked against the md5sums it was shipped with."""
    options = [f"--root={root}"] if root is not None else []
    return [dpkg, *options, "--verify", package_name]


def rpm_verify_argv(rpm: str, root: Path | None, package_name: str) -> list[str]:
    """``rpm -V <name>``: every file checked against the package's digests, sizes and modes."""
    return [rpm, *rpm_options(root), "-V", package_name]


def changed_files(output: str) -> list[str]:
    """The files a ``dpkg --verify`` or ``rpm -V`` report says were altered or removed, configuration aside.

    Each line is ``<attributes> [c] <path>`` (``??5??????  /opt/x`` for dpkg,
    ``S.5....T.  /opt/x`` for rpm) or ``missing [c] <path>``. A configuration
    file (``c``) an administrator edits is not drift; its removal is not either.
    A changed digest (``5``), size (``S``) or a missing file is.
    """
    changed: list[str] = []
    for line in output.splitlines():
        attributes, _, rest = line.partition(" ")
        rest = rest.lstrip(" ")
        if rest.startswith("c "):
            continue  # a configuration file: the administrator's to edit
        if not rest.startswith("/"):
            continue  # a warning line, not a file
        if attributes == "missing" or "5" in attributes or attributes.startswith("S"):
            changed.append(rest)
    return changed


def package_changes(kind: str, package_name: str, root: Path | None = None,
                    env: Mapping[str, str] | None = None) -> list[str] | None:
    """The files of an installed deb or rpm package changed on disk (empty: none), None if it cannot be checked."""
    try:
        if kind == "deb":
            argv = dpkg_verify_argv(find_tool("dpkg", env), root, package_name)
        elif kind == "rpm":
            argv = rpm_verify_argv(find_tool("rpm", env), root, package_name)
        else:
            return None
        result = run_query(argv)
    except (NativeToolMissing, OSError, subprocess.TimeoutExpired):
        return None
    return changed_files(result.output)

