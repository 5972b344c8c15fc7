"""Simulated installer for vpn-client 5.1.0: install, uninstall or detect.

Installs into $RECONCILER_ROOT/programs/vpn-client and appends a line to
$RECONCILER_ROOT/install.log for every install run.
"""
import os
import shutil
import sys
from pathlib import Path

NAME, VERSION = "vpn-client", "5.1.0"
root = Path(os.environ["RECONCILER_ROOT"])
target = root / "programs" / NAME


def install() -> int:
    arch = os.environ.get("RECONCILER_ARCH", "x86_64")
    if arch not in ("x86_64", "x86"):
        print(f"error: no network driver for architecture {arch!r}", file=sys.stderr)
        return 3
    target.mkdir(parents=True, exist_ok=True)
    (target / "VERSION").write_text(VERSION + "\n")
    with open(root / "install.log", "a") as log:
        log.write(f"{NAME} {VERSION}\n")
    print(f"installed {NAME} {VERSION} into {target}")
    return 0


def uninstall() -> int:
    shutil.rmtree(target, ignore_errors=True)
    print(f"removed {NAME}")
    return 0


def detect() -> int:
    version_file = target / "VERSION"
    present = version_file.is_file() and version_file.read_text().strip() == VERSION
    return 0 if present else 1


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    handlers = {"install": install, "uninstall": uninstall, "detect": detect}
    if command not in handlers:
        print("usage: setup.py install|uninstall|detect", file=sys.stderr)
        sys.exit(2)
    sys.exit(handlers[command]())
