"""Simulated installer for text-editor 8.6: install or uninstall.

A real one would run the vendor's setup program, which writes the Uninstall
registry key the package's spec.detect reads (DisplayVersion = 8.6).
"""
import os
import shutil
import sys
from pathlib import Path

NAME, VERSION = "text-editor", "8.6"
target = Path(os.environ.get("ProgramFiles") or os.environ["RECONCILER_ROOT"]) / "TextEditor"


def install() -> int:
    target.mkdir(parents=True, exist_ok=True)
    (target / "version.txt").write_text(f"version={VERSION}\n")
    print(f"installed {NAME} {VERSION} into {target}")
    return 0


def uninstall() -> int:
    shutil.rmtree(target, ignore_errors=True)
    print(f"removed {NAME}")
    return 0


if __name__ == "__main__":
    handlers = {"install": install, "uninstall": uninstall}
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command not in handlers:
        print("usage: setup.py install|uninstall", file=sys.stderr)
        sys.exit(2)
    sys.exit(handlers[command]())
