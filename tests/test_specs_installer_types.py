"""Package specs of the native installer types (msi, exe, deb, rpm) and declared exit codes.

Each case is a tiny repo in ``tmp_path`` loaded as ``reconciler validate``
loads one (:func:`load_repo`: the listing decides whether an artifact path is
a file or a directory). An error must name the file, the line of the
offending field and the field.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler import protocol
from reconciler.repo_tree import load_repo
from reconciler.specs import InstallerType

TOPOLOGY = """\
apiVersion: reconciler/v1
kind: Topology
metadata: {name: t}
spec:
  headquarters: hq
  relays:
    - {name: relay-a, parent: hq}
"""
PRODUCT = "{8A1F3C2D-1B2C-4D5E-8F90-A1B2C3D4E5F6}"
SHA = "0" * 64


def _repo(tmp_path: Path, body: str, version: str = "1.0") -> Path:
    """A repo with one package ``packages/app.yaml`` whose spec ends with ``body`` (artifact and installer)."""
    repo = tmp_path / "repo"
    (repo / "packages").mkdir(parents=True)
    (repo / "artifacts" / "tree").mkdir(parents=True)
    (repo / "artifacts" / "tree" / "a.txt").write_text("a\n")
    (repo / "artifacts" / "tree.msi").mkdir()  # a directory with an installer's name
    (repo / "artifacts" / "tree.msi" / "a.txt").write_text("a\n")
    for name in ("Hello-1.0.msi", "HelloSetup.exe", "hello_1.0_all.deb", "hello-1.0-1.noarch.rpm"):
        (repo / "artifacts" / name).write_bytes(b"bytes of " + name.encode())
    (repo / "topology.yaml").write_text(TOPOLOGY)
    (repo / "packages" / "app.yaml").write_text(
        "apiVersion: reconciler/v1\nkind: Package\nmetadata: {name: app}\nspec:\n  name: app\n"
        f"  version: \"{version}\"\n" + body)
    return repo


VALID = {
    "msi": f"""\
  artifact: {{path: artifacts/Hello-1.0.msi}}
  installer:
    type: msi
    productCode: "{PRODUCT}"
    properties: {{INSTALLDIR: 'C:\\Program Files\\Hello', ALLUSERS: "1", REBOOT.PROMPT: ReallySuppress}}
    successExitCodes: [1638]
    rebootExitCodes: [1]
""",
    "exe": f"""\
  artifact: {{url: "https://downloads.example.invalid/HelloSetup.exe?x=1", sha256: "{SHA}"}}
  installer:
    type: exe
    install: [/S]
    uninstall: ['C:\\Program Files\\Hello\\uninst.exe', /S]
    detect: [cmd, /c, exit 0]
    successExitCodes: [0, 2]
    rebootExitCodes: [3010, 4294967295]
""",
    "deb": """\
  artifact: {path: artifacts/hello_1.0_all.deb}
  installer: {type: deb, packageName: hello-tool+x.y}
""",
    "rpm": """\
  artifact: {path: artifacts/hello-1.0-1.noarch.rpm}
  installer: {type: rpm, packageName: Hello_Tool}
""",
    "command": """\
  artifact: {path: artifacts/tree}
  installer:
    type: command
    install: [sh, install.sh]
    uninstall: [sh, uninstall.sh]
    successExitCodes: [0, 5]
    rebootExitCodes: [7]
""",
}


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_installer_types_load(tmp_path: Path, kind: str) -> None:
    result = load_repo(_repo(tmp_path, VALID[kind], "1.0-1" if kind == "rpm" else "1.0"))
    assert result.errors == (), [str(e) for e in result.errors]
    assert result.specs is not None
    (package,) = result.specs.packages
    installer = package.installer
    assert installer.type is InstallerType(kind)
    wire = protocol.installer_of(installer)
    if kind == "msi":
        assert installer.product_code == PRODUCT
        assert installer.properties == (("INSTALLDIR", "C:\\Program Files\\Hello"), ("ALLUSERS", "1"),
                                        ("REBOOT.PROMPT", "ReallySuppress"))
        assert installer.exit_codes() == ((0, 1638), (3010, 1641, 1))
        assert wire["productCode"] == PRODUCT and list(wire["properties"]) == ["INSTALLDIR", "ALLUSERS",
                                                                               "REBOOT.PROMPT"]
    elif kind == "exe":
        assert installer.exit_codes() == ((0, 2), (3010, 4294967295))
        assert wire["successExitCodes"] == [0, 2] and wire["rebootExitCodes"] == [3010, 4294967295]
    elif kind in ("deb", "rpm"):
        assert wire["packageName"] == installer.package_name and "productCode" not in wire
        assert installer.exit_codes() == ((0,), ())
    else:
        assert installer.exit_codes() == ((0, 5), (7,))


def _one_error(tmp_path: Path, body: str, version: str = "1.0") -> tuple[int, str]:
    result = load_repo(_repo(tmp_path, body, version))
    errors = [e for e in result.errors if e.path == "packages/app.yaml"]
    assert len(errors) == 1 and result.specs is None, [str(e) for e in result.errors]
    return errors[0].line, str(errors[0])


def _line_of(body: str, marker: str) -> int:
    """The line of ``packages/app.yaml`` holding ``marker`` (the body starts on line 7)."""
    if marker == "version:":
        return 6
    for number, line in enumerate(body.splitlines(), start=7):
        if marker in line:
            return number
    raise AssertionError(marker)


BAD = [
    # (body, marker on the offending line, expected message part)
    ("  artifact: {path: artifacts/Hello-1.0.msi}\n  installer:\n    type: msi\n",
     "installer:", "/spec/installer: missing required field 'productCode'"),
    (f"  artifact: {{path: artifacts/Hello-1.0.msi}}\n  installer:\n    type: msi\n"
     f"    productCode: \"{PRODUCT.lower()}\"\n",
     "productCode", "/spec/installer/productCode: " + repr(PRODUCT.lower()) + " is not a product code"),
    (f"  artifact: {{path: artifacts/Hello-1.0.msi}}\n  installer:\n    type: msi\n"
     f"    productCode: \"{PRODUCT}\"\n    properties: {{installdir: x}}\n",
     "properties", "/spec/installer/properties: 'installdir' is not a public property name"),
    (f"  artifact: {{path: artifacts/Hello-1.0.msi}}\n  installer:\n    type: msi\n"
     f"    productCode: \"{PRODUCT}\"\n    properties: {{TARGET: 'a\" /x \"b'}}\n",
     "TARGET", "holds a double quote or a control character"),
    (f"  artifact: {{path: artifacts/Hello-1.0.msi}}\n  installer:\n    type: msi\n"
     f"    productCode: \"{PRODUCT}\"\n    packageName: hello\n",
     "packageName", "/spec/installer/packageName: packageName is for installer type deb, rpm, not msi"),
    (f"  artifact: {{path: artifacts/Hello-1.0.msi}}\n  installer:\n    type: msi\n"
     f"    productCode: \"{PRODUCT}\"\n    install: [/quiet]\n",
     "install:", "/spec/installer/install: install is for installer type files, command, exe, not msi"),
    (f"  artifact: {{path: artifacts/hello_1.0_all.deb}}\n  installer:\n    type: deb\n"
     f"    packageName: hello\n    productCode: \"{PRODUCT}\"\n",
     "productCode", "/spec/installer/productCode: productCode is for installer type msi, not deb"),
    ("  artifact: {path: artifacts/hello_1.0_all.deb}\n  installer:\n    type: deb\n"
     "    packageName: hello\n    rebootExitCodes: [1]\n",
     "rebootExitCodes", "rebootExitCodes is for installer type command, exe, msi, not deb"),
    ("  artifact: {path: artifacts/hello_1.0_all.deb}\n  installer:\n    type: deb\n    packageName: Hello_Tool\n",
     "packageName", "/spec/installer/packageName: 'Hello_Tool' is not a Debian package name"),
    ("  artifact: {path: artifacts/hello_1.0_all.deb}\n  installer:\n    type: deb\n",
     "installer:", "missing required field 'packageName'"),
    ("  artifact: {path: artifacts/hello-1.0-1.noarch.rpm}\n  installer:\n    type: rpm\n    packageName: a/b\n",
     "packageName", "/spec/installer/packageName: 'a/b' is not a package name"),
    ("  artifact: {path: artifacts/HelloSetup.exe}\n  installer:\n    type: exe\n    install: [/S]\n",
     "installer:", "missing required field 'uninstall'"),
    ("  artifact: {path: artifacts/tree}\n  installer:\n    type: command\n    install: [a]\n    uninstall: [b]\n"
     "    successExitCodes: [-1]\n",
     "successExitCodes", "/spec/installer/successExitCodes/0: 0 must be at least 0, got -1"),
    ("  artifact: {path: artifacts/tree}\n  installer:\n    type: command\n    install: [a]\n    uninstall: [b]\n"
     "    rebootExitCodes: [4294967296]\n",
     "rebootExitCodes", "must be at most 4294967295, got 4294967296"),
    ("  artifact: {path: artifacts/tree}\n  installer:\n    type: command\n    install: [a]\n    uninstall: [b]\n"
     f"    successExitCodes: {list(range(33))}\n",
     "successExitCodes", "/spec/installer/successExitCodes: must list at most 32 items, got 33"),
    ("  artifact: {path: artifacts/tree}\n  installer:\n    type: command\n    install: [a]\n    uninstall: [b]\n"
     "    successExitCodes: [0, 0]\n",
     "successExitCodes", "items must be unique"),
    ("  artifact: {path: artifacts/tree}\n  installer:\n    type: command\n    install: [a]\n    uninstall: [b]\n"
     "    successExitCodes: ['0']\n",
     "successExitCodes", "/spec/installer/successExitCodes/0: expected integer"),
    ("  artifact: {path: artifacts/tree}\n  installer:\n    type: command\n    install: [a]\n    uninstall: [b]\n"
     "    rebootExitCodes: [0]\n",
     "rebootExitCodes", "/spec/installer/rebootExitCodes/0: exit code 0 is also in the default success codes"),
    ("  artifact: {path: artifacts/tree}\n  installer:\n    type: command\n    install: [a]\n    uninstall: [b]\n"
     "    successExitCodes: [0, 3010]\n    rebootExitCodes: [3010]\n",
     "rebootExitCodes", "exit code 3010 is also in successExitCodes"),
    (f"  artifact: {{path: artifacts/Hello-1.0.msi}}\n  installer:\n    type: msi\n"
     f"    productCode: \"{PRODUCT}\"\n    successExitCodes: [3010]\n",
     "successExitCodes", "/spec/installer/successExitCodes/0: exit code 3010 already means success with a reboot"),
    (f"  artifact: {{path: artifacts/tree.msi}}\n  installer:\n    type: msi\n    productCode: \"{PRODUCT}\"\n",
     "artifact", "/spec/artifact/path: an msi installer's artifact must be one .msi file; 'artifacts/tree.msi' is "
                 "a directory"),
    (f"  artifact: {{path: artifacts/HelloSetup.exe}}\n  installer:\n    type: msi\n    productCode: \"{PRODUCT}\"\n",
     "artifact", "/spec/artifact/path: an msi installer's artifact must be a .msi file; 'artifacts/HelloSetup.exe' "
                 "is not named *.msi"),
    (f"  artifact: {{url: 'https://example.invalid/get?file=hello.deb', sha256: '{SHA}'}}\n"
     "  installer: {type: deb, packageName: hello}\n",
     "artifact", "/spec/artifact/url: a deb installer's artifact must be a .deb file; the URL's file name is 'get'"),
    ("  artifact: {path: artifacts/tree}\n  installer: {type: rpm, packageName: hello}\n",
     "artifact", "is a directory"),
    ("  artifact: {path: artifacts/hello-1.0-1.noarch.rpm}\n  installer: {type: rpm, packageName: hello}\n",
     "version:", "/spec/version: an rpm package's version is its VERSION-RELEASE, such as \"1.0-1\" (one '-'), "
                 "got '1.0'"),
]


@pytest.mark.parametrize(("body", "marker", "message"), BAD, ids=[m[:60] for _, _, m in BAD])
def test_bad_installer_fields_are_errors_at_their_line(tmp_path: Path, body: str, marker: str, message: str) -> None:
    rpm = "type: rpm" in body and marker != "version:"
    line, text = _one_error(tmp_path, body, "1.0-1" if rpm else "1.0")
    assert message in text, text
    assert text.startswith(f"packages/app.yaml:{line}:")
    assert line == _line_of(body, marker), text


def test_schema_copies_stay_identical() -> None:
    root = Path(__file__).resolve().parent.parent
    assert (root / "schemas/package.schema.json").read_bytes() == \
        (root / "example-repo/schemas/package.schema.json").read_bytes()
