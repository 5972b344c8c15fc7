"""Reboots on the client: the boot id the agent reports, and the reboot an installer asked for.

* **Boot id.** :func:`read_boot_id` tells one boot of this machine from the
  next: Linux's ``/proc/sys/kernel/random/boot_id``; on Windows the boot
  counter the prefetcher keeps (``BootId``), else the boot time (the clock
  less ``GetTickCount64``, rounded to the minute so that two readings in one
  boot agree); on macOS
  ``sysctl -n kern.boottime``'s seconds. None where it cannot be read: the
  agent then sends no ``bootId`` and a relay keeps a pending reboot until
  another boot id arrives.
* **The reboot.** With ``reboot: ifRequired`` on an action (HQ's signed job
  or package says so) and a succeeded result that asks for a reboot, the
  agent runs its reboot command once every action of the reply has finished
  and its result is journalled, never while an installer runs, and at most
  once per boot (:class:`RebootGate`, ``<root>/reboot.json``). The default
  command (:func:`default_reboot_command`) reboots after a minute, so the
  agent's next check-in reports the results first.
"""

from __future__ import annotations

import ctypes
import json
import logging
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from reconciler import protocol
from reconciler.fileio import write_json_atomic
from reconciler.times import format_time

log = logging.getLogger("reconciler.agent")

LINUX_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
REBOOT_STATE = "reboot.json"
REBOOT_COMMAND_TIMEOUT = 120  # seconds the reboot command may take to schedule the reboot
PACKAGES_PLACEHOLDER = "{packages}"  # replaced, in each argument of the reboot command, by the package names
MAX_PACKAGES_TEXT = 200  # characters of package names put into the reboot command


def read_boot_id(system: str | None = None) -> str | None:
    """This boot's id (:data:`reconciler.protocol.BOOT_ID`), or None where it cannot be read."""
    system = (system or platform.system()).lower()
    text: str | None = None
    try:
        if system == "linux":
            text = LINUX_BOOT_ID.read_text(encoding="ascii").strip()
        elif system == "windows":
            text = _windows_boot_time()
        elif system == "darwin":
            text = _darwin_boot_time()
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return text if text is not None and protocol.is_boot_id(text) else None


_PREFETCH_KEY = r"SYSTEM\CurrentControlSet\Control\Session Manager\Memory Management\PrefetchParameters"


def _windows_boot_time() -> str | None:
    """Windows' boot counter (``BootId`` under the prefetch parameters, one more at every boot), else the boot
    time: the clock less ``GetTickCount64``, rounded to the minute."""
    if sys.platform == "win32":
        import winreg
        try:
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, _PREFETCH_KEY) as key:
                value, kind = winreg.QueryValueEx(key, "BootId")
            if kind == winreg.REG_DWORD and isinstance(value, int):
                return f"boot-{value}"
        except OSError:
            pass
    windll = getattr(ctypes, "windll", None)
    if windll is None:
        return None
    tick = windll.kernel32.GetTickCount64
    tick.restype = ctypes.c_uint64
    booted = datetime.now(timezone.utc) - timedelta(milliseconds=int(tick()))
    booted = (booted + timedelta(seconds=30)).replace(second=0, microsecond=0)  # to the nearest minute
    return format_time(booted)


_BOOTTIME = re.compile(r"sec\s*=\s*(\d+)")


def _darwin_boot_time() -> str | None:
    out = subprocess.run(["sysctl", "-n", "kern.boottime"], capture_output=True, text=True, timeout=10,
                         check=True).stdout
    match = _BOOTTIME.search(out)
    return match.group(1) if match else None


def default_reboot_command(system: str | None = None) -> list[str]:
    """The reboot command of ``reconciler agent`` without ``--reboot-command``: a reboot a minute from now."""
    system = (system or platform.system()).lower()
    if system == "windows":
        return ["shutdown", "/r", "/t", "60", "/c", f"reconciler: reboot required by {PACKAGES_PLACEHOLDER}"]
    if system == "darwin":
        return ["shutdown", "-r", "+1"]
    return ["shutdown", "-r", "+1", f"reconciler: reboot required by {PACKAGES_PLACEHOLDER}"]


class RebootGate:
    """At most one reboot command per boot: the boot id it last ran in is kept in ``<root>/reboot.json``.

    Without a boot id (none readable, none given with ``--fact``) one run of
    the agent runs it at most once.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / REBOOT_STATE
        self._ran_unknown = False

    def _last(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return raw if isinstance(raw, dict) else {}

    def ran_in(self, boot_id: str | None) -> bool:
        """Whether the reboot command ran already in this boot."""
        if boot_id is None:
            return self._ran_unknown
        return self._last().get("bootId") == boot_id

    def record(self, boot_id: str | None, packages: Sequence[str], now: datetime) -> None:
        """Note, before the command runs, that it runs in this boot (a crash must not make it run twice)."""
        self._ran_unknown = True
        write_json_atomic(self.path, {"bootId": boot_id, "at": format_time(now), "packages": list(packages)})


def reboot_argv(command: Sequence[str], packages: Sequence[str]) -> list[str]:
    """The reboot command with ``{packages}`` replaced by the names of the packages that asked for it."""
    names = ", ".join(packages)
    if len(names) > MAX_PACKAGES_TEXT:  # Windows' shutdown /c takes at most 512 characters
        names = names[:MAX_PACKAGES_TEXT - 1] + "…"
    return [part.replace(PACKAGES_PLACEHOLDER, names) for part in command]


def run_reboot_command(argv: Sequence[str]) -> str | None:
    """Run the reboot command (no shell); None if it succeeded, else why not."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=REBOOT_COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout or "").strip().splitlines()[-1:] or [""]
        return f"exit code {done.returncode}: {tail[0][:300]}"
    return None


__all__ = ["RebootGate", "default_reboot_command", "read_boot_id", "reboot_argv", "run_reboot_command"]
