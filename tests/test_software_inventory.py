"""The OS's software inventory on the agent: real dpkg and rpm databases in sandboxes, stand-ins for the rest.

dpkg and rpm run for real against databases built in ``tmp_path``
(``tests/package_sandbox.py``); the machine's own dpkg database is checked
to be unchanged. The Windows registry and macOS pkgutil are the far edge:
their parsers get captured or stand-in data. Hostile output (10,000
entries, a 1 MB name, bytes that are not UTF-8, control characters, a tool
that hangs or never stops printing) comes from stand-in tools run as real
subprocesses.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from package_sandbox import DpkgSandbox, RpmSandbox, have, system_dpkg_fingerprint

from reconciler import protocol
from reconciler.agent import software
from reconciler.agent.software import CollectError, Collector, bound, run_tool

needs_dpkg = pytest.mark.skipif(not have("dpkg", "dpkg-deb", "dpkg-query"), reason="needs dpkg")
needs_rpm = pytest.mark.skipif(not have("rpm", "rpmbuild"), reason="needs rpm and rpmbuild")


def tool(tmp_path: Path, name: str, body: str | bytes) -> Path:
    """A stand-in tool: a shell script (its output as given)."""
    path = tmp_path / name
    path.write_bytes(b"#!/bin/sh\n" + (body.encode() if isinstance(body, str) else body))
    path.chmod(0o755)
    return path


def printing(tmp_path: Path, output: bytes) -> Path:
    """A stand-in tool that prints exactly ``output``, whatever its arguments."""
    data = tmp_path / "output.bin"
    data.write_bytes(output)
    return tool(tmp_path, "print-output", f'exec cat "{data}"\n')


def names(collected: software.Collected) -> list[tuple[str, str, str]]:
    return [(e["name"], e["version"], e["source"]) for e in collected.entries]


# ------------------------------------------------------------------ dpkg, for real


@needs_dpkg
def test_dpkg_lists_only_what_a_real_sandbox_database_has_installed(tmp_path: Path) -> None:
    before = system_dpkg_fingerprint()
    box = DpkgSandbox(tmp_path)
    box.install("sandbox-editor", "1.2.3-1")
    box.install("sandbox-tool", "0.9", conffile=True)
    box.remove("sandbox-tool")  # its conffile stays: status config-files, not installed
    box.install("sandbox-lib", "1.0")
    box.install("sandbox-lib", "2.0+dfsg-1")  # an upgrade: only the new version is listed
    assert box.status_of("sandbox-tool") == "config-files"

    collector = Collector(platform="linux", dpkg_admindir=box.admindir)
    assert collector.kind() == "dpkg"
    collected = collector.collect()

    assert collected.error is None
    assert names(collected) == [("sandbox-editor", "1.2.3-1", "dpkg"), ("sandbox-lib", "2.0+dfsg-1", "dpkg")]
    assert collected.omitted == 0
    assert system_dpkg_fingerprint() == before, "the machine's dpkg database changed"


@needs_dpkg
def test_an_empty_sandbox_database_is_an_empty_list_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    box = DpkgSandbox(tmp_path / "empty")
    assert Collector(platform="linux", dpkg_admindir=box.admindir).collect() == software.Collected((), 0, None)
    missing = Collector(platform="linux", dpkg_admindir=tmp_path / "nowhere",
                        which=lambda name: shutil.which(name) if name == "dpkg-query" else None)
    assert missing.kind() is None
    assert missing.collect().error == ("no software inventory on linux: found none of dpkg-query, rpm, pkgutil")


def test_a_dpkg_status_file_written_by_hand_is_read_with_the_same_filter(tmp_path: Path) -> None:
    if not have("dpkg-query"):
        pytest.skip("needs dpkg-query")
    admindir = tmp_path / "dpkg"
    (admindir / "info").mkdir(parents=True)
    stanzas = [("ok-one", "install ok installed", "1.0"), ("half", "install reinstreq half-installed", "2.0"),
               ("unpacked", "install ok unpacked", "3.0"), ("gone", "deinstall ok config-files", "4.0"),
               ("held", "hold ok installed", "5.0")]
    (admindir / "status").write_text("".join(
        f"Package: {n}\nStatus: {s}\nPriority: optional\nSection: misc\nMaintainer: T <t@example.invalid>\n"
        f"Architecture: all\nVersion: {v}\nDescription: d\n\n" for n, s, v in stanzas), encoding="utf-8")
    collected = Collector(platform="linux", dpkg_admindir=admindir).collect()
    assert names(collected) == [("held", "5.0", "dpkg"), ("ok-one", "1.0", "dpkg")]


# ------------------------------------------------------------------ rpm, for real


@needs_rpm
def test_rpm_lists_a_real_sandbox_database_with_epochs(tmp_path: Path) -> None:
    box = RpmSandbox(tmp_path)
    box.install("sandbox-rpm", "2.0", "3", epoch=1)
    box.install("plain-rpm", "0.5", "1.el9")
    collector = Collector(platform="linux", rpm_root=box.root,
                          which=lambda name: None if name == "dpkg-query" else shutil.which(name))
    assert collector.kind() == "rpm"
    collected = collector.collect()
    assert collected.error is None
    assert names(collected) == [("plain-rpm", "0.5-1.el9", "rpm"), ("sandbox-rpm", "1:2.0-3", "rpm")]


def test_parse_rpm_reads_name_and_version_per_line() -> None:
    text = "bash\t5.1.8-6.el9\nkernel\t5.14.0-362.el9\nkernel\t5.14.0-284.el9\nbroken line\n\tno-name\n"
    assert software.parse_rpm(text) == [("bash", "5.1.8-6.el9", "rpm"), ("kernel", "5.14.0-362.el9", "rpm"),
                                        ("kernel", "5.14.0-284.el9", "rpm")]


# ------------------------------------------------------------------ Windows registry (stand-in reader)


def test_registry_entries_skip_system_components_and_nameless_keys() -> None:
    keys: list[dict[str, Any]] = [
        {"DisplayName": "Mozilla Firefox (x64 en-US)", "DisplayVersion": "120.0.1"},
        {"DisplayName": "Mozilla Firefox (x64 en-US)", "DisplayVersion": "120.0.1"},  # HKLM 64-bit and HKCU
        {"DisplayName": "7-Zip 23.01 (x64)", "DisplayVersion": "23.01", "SystemComponent": 0},
        {"DisplayName": "Microsoft Visual C++ 2022 X64 Minimum Runtime", "DisplayVersion": "14.38",
         "SystemComponent": 1},
        {"DisplayVersion": "1.0"},  # no DisplayName: an update or a leftover
        {"DisplayName": "   ", "DisplayVersion": "1.0"},
        {"DisplayName": "Tool\r\nwith\x1b[31m controls", "DisplayVersion": 7},  # a DWORD version
        {"DisplayName": "No version"},
    ]
    collected = Collector(platform="win32", registry=lambda: iter(keys)).collect()
    assert collected.error is None
    assert names(collected) == [("7-Zip 23.01 (x64)", "23.01", "registry"),
                                ("Mozilla Firefox (x64 en-US)", "120.0.1", "registry"),
                                ("No version", "", "registry"),
                                ("Tool with [31m controls", "", "registry")]


def test_a_registry_that_fails_is_reported_not_raised() -> None:
    def broken() -> list[dict[str, Any]]:
        raise PermissionError(5, "Access is denied")
    collected = Collector(platform="win32", registry=broken).collect()
    assert (collected.entries, collected.error) == ((), "registry: Access is denied")


# ------------------------------------------------------------------ macOS pkgutil (captured text)

PKG_INFO = """\
package-id: com.apple.pkg.CLTools_Executables
version: 15.1.0.0.1.1700200546
volume: /
location: /
install-time: 1701428212
"""


def test_pkgutil_output_is_parsed() -> None:
    assert software.parse_pkgs("com.apple.pkg.CLTools_Executables\n\norg.python.Python.PythonFramework-3.12\n") == [
        "com.apple.pkg.CLTools_Executables", "org.python.Python.PythonFramework-3.12"]
    assert software.parse_pkg_info(PKG_INFO) == ("com.apple.pkg.CLTools_Executables", "15.1.0.0.1.1700200546")
    assert software.parse_pkg_info("version: 1\n") is None
    assert software.parse_pkg_info("package-id: x.y\n") == ("x.y", "")


def test_pkgutil_collector_asks_each_package_for_its_version(tmp_path: Path) -> None:
    stand_in = tool(tmp_path, "pkgutil-stand-in", """\
shift  # the tool name the collector puts after the prefix
case "$1" in
  --pkgs) printf 'com.example.one\\ncom.example.forgotten\\ncom.example.two\\n' ;;
  --pkg-info)
    case "$2" in
      com.example.forgotten) echo "No receipt for '$2' found at '/'." >&2; exit 1 ;;
      *) printf 'package-id: %s\\nversion: 2.%s\\nvolume: /\\n' "$2" "${#2}" ;;
    esac ;;
esac
""")
    collected = Collector(platform="darwin", prefix=(str(stand_in),)).collect()
    assert collected.error is None
    assert names(collected) == [("com.example.one", "2.15", "pkgutil"), ("com.example.two", "2.15", "pkgutil")]


# ------------------------------------------------------------------ choosing the collector


@pytest.mark.parametrize(("platform", "tools", "dpkg_db", "expected"), [
    ("linux", {"dpkg-query", "rpm"}, True, "dpkg"),
    ("linux", {"dpkg-query", "rpm"}, False, "rpm"),  # dpkg-query without a database: an rpm system
    ("linux", {"rpm"}, True, "rpm"),
    ("linux", set(), True, None),
    ("darwin", {"pkgutil"}, False, "pkgutil"),
    ("darwin", set(), False, None),
    ("win32", set(), False, "registry"),
])
def test_the_collector_is_chosen_by_platform_and_by_which_tool_exists(
        tmp_path: Path, platform: str, tools: set[str], dpkg_db: bool, expected: str | None) -> None:
    admindir = tmp_path / "dpkg"
    admindir.mkdir()
    if dpkg_db:
        (admindir / "status").touch()
    collector = Collector(platform=platform, dpkg_admindir=admindir,
                          which=lambda name: f"/usr/bin/{name}" if name in tools else None)
    assert collector.kind() == expected


# ------------------------------------------------------------------ bounds and hostile output


def dpkg_lines(entries: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(b"installed\t" + name + b"\t" + version + b"\n" for name, version in entries)


def test_ten_thousand_entries_are_cut_to_the_limit_and_the_cut_is_counted(tmp_path: Path) -> None:
    output = dpkg_lines([(f"pkg{i:05d}".encode(), b"1.0") for i in range(10_000)])
    collected = Collector(platform="linux", prefix=(str(printing(tmp_path, output)),)).collect()
    assert (len(collected.entries), collected.omitted) == (protocol.MAX_SOFTWARE, 10_000 - protocol.MAX_SOFTWARE)
    assert collected.entries[-1]["name"] == f"pkg{protocol.MAX_SOFTWARE - 1:05d}"  # sorted, the end is cut
    body = {"facts": {}, "inventory": [], "software": list(collected.entries), "softwareOmitted": collected.omitted,
            "softwareDigest": collected.digest}
    assert protocol.check_checkin(body)["softwareOmitted"] == 5000


def test_long_entries_are_cut_by_the_bytes_a_check_in_may_carry(tmp_path: Path) -> None:
    output = dpkg_lines([(b"n" * 300 + f"{i:05d}".encode(), b"v" * 300) for i in range(protocol.MAX_SOFTWARE)])
    collected = Collector(platform="linux", prefix=(str(printing(tmp_path, output)),)).collect()
    entries = list(collected.entries)
    assert all(len(e["name"]) == protocol.MAX_SOFTWARE_NAME and e["name"].endswith("…") for e in entries)
    assert all(len(e["version"]) == protocol.MAX_SOFTWARE_VERSION for e in entries)
    # cutting names to 200 characters made them equal: one entry is left of 5,000
    assert (len(entries), collected.omitted) == (1, 0)
    many = [("xé" * 95 + f"{i:05d}", "v" * 100, "dpkg") for i in range(protocol.MAX_SOFTWARE)]
    kept, omitted = bound(many)
    size = len(json.dumps(list(kept)))
    assert size <= protocol.MAX_SOFTWARE_BYTES and omitted == protocol.MAX_SOFTWARE - len(kept) > 0
    body = json.dumps({"facts": {}, "inventory": [], "software": list(kept), "softwareOmitted": omitted,
                       "softwareDigest": protocol.software_digest(list(kept), omitted)}).encode()
    assert len(body) < protocol.MAX_BODY
    assert protocol.check_checkin(protocol.decode_json(body))["softwareOmitted"] == omitted


def test_a_one_megabyte_name_bad_bytes_and_control_characters_are_cleaned(tmp_path: Path) -> None:
    output = dpkg_lines([
        (b"A" * 1024 * 1024, b"1"),
        (b"latin1-\xe9t\xe9", b"2.\xff\xfe0"),
        (b"esc\x1b[2Jape", b"3\x00\x07"),
        (b"bidi\xe2\x80\xaename", b"4"),  # U+202E is text, kept (status output escapes it)
        (b"", b"5"),
    ])
    collected = Collector(platform="linux", prefix=(str(printing(tmp_path, output)),)).collect()
    got = names(collected)
    assert got[0] == ("A" * (protocol.MAX_SOFTWARE_NAME - 1) + "…", "1", "dpkg")
    assert ("bidi\u202ename", "4", "dpkg") in got
    assert ("esc [2Jape", "3", "dpkg") in got
    assert ("latin1-\ufffdt\ufffd", "2.\ufffd\ufffd0", "dpkg") in got
    assert len(got) == 4  # the nameless line names nothing
    body = {"facts": {}, "inventory": [], "software": list(collected.entries),
            "softwareDigest": collected.digest}
    assert protocol.check_checkin(protocol.decode_json(json.dumps(body).encode()))["software"] == list(
        collected.entries)


def test_a_tool_that_hangs_is_killed_at_the_timeout(tmp_path: Path) -> None:
    hangs = tool(tmp_path, "hangs", "exec sleep 60\n")
    collected = Collector(platform="linux", prefix=(str(hangs),), timeout=0.5).collect()
    assert (collected.entries, collected.error) == ((), f"{hangs}: timed out")


def test_output_beyond_the_bound_is_not_read(tmp_path: Path) -> None:
    endless = tool(tmp_path, "endless", "exec yes 'installed\tpkg\t1.0'\n")
    text = run_tool([str(endless)], deadline=software.time.monotonic() + 60, max_output=100_000)
    assert 0 < len(text) <= 100_000 and text.endswith("1.0")
    assert set(text.splitlines()) == {"installed\tpkg\t1.0"}


def test_a_failing_tool_names_its_exit_code_and_says_what_it_printed(tmp_path: Path) -> None:
    fails = tool(tmp_path, "fails", "echo 'dpkg-query: error: cannot read status' >&2; exit 2\n")
    with pytest.raises(CollectError, match=r"exit code 2: dpkg-query: error: cannot read status"):
        run_tool([str(fails)], deadline=software.time.monotonic() + 60)
    collected = Collector(platform="linux", prefix=(str(fails),)).collect()
    assert collected.entries == () and collected.error is not None and "exit code 2" in collected.error


def test_the_digest_changes_with_any_entry_and_with_the_cut() -> None:
    entries, _ = bound([("bash", "5.2", "dpkg"), ("curl", "8.0", "dpkg")])
    digest = protocol.software_digest(list(entries))
    assert protocol.is_digest(digest)
    assert digest != protocol.software_digest(list(entries), 1)
    assert digest != protocol.software_digest([entries[0], {**entries[1], "version": "8.1"}])
    assert digest == protocol.software_digest(list(bound([("curl", "8.0", "dpkg"), ("bash", "5.2", "dpkg")])[0]))


def test_the_windows_reader_is_only_imported_on_windows() -> None:
    source = Path(software.__file__).read_text(encoding="utf-8")
    assert "import winreg" not in source and "winreg" not in sys.modules


# ------------------------------------------------------------------ software.json (pure render and read)

from reconciler import report  # noqa: E402


def test_software_json_round_trips_and_names_most_clients_by_who_lacks_it() -> None:
    lists = {
        "pc-1": ([("bash", "5.2", "dpkg"), ("Firefox", "120", "registry")], 0),
        "pc-2": ([("bash", "5.2", "dpkg"), ("Firefox", "121", "registry")], 12),
        "pc-3": ([("bash", "5.2", "dpkg"), ("bash", "5.1", "dpkg")], 0),
        "pc-4": ([], 0),
    }
    data = report.render_relay_software("relay-a", lists)
    doc = json.loads(data)
    assert doc["clients"] == ["pc-1", "pc-2", "pc-3", "pc-4"] and doc["omitted"] == {"pc-2": 12}
    assert doc["software"][0] == {"name": "bash", "source": "dpkg",
                                  "versions": {"5.1": {"clients": [2]}, "5.2": {"allBut": [3]}}}
    assert len(data.splitlines()) == 2 + len(doc["software"])  # one line per (name, source): one-line diffs
    parsed = report.parse_relay_software(data, "relays/relay-a/software.json")
    assert parsed.lists()["pc-3"] == ({"name": "bash", "version": "5.1", "source": "dpkg"},
                                      {"name": "bash", "version": "5.2", "source": "dpkg"})
    assert parsed.lists()["pc-4"] == () and parsed.omitted == {"pc-2": 12}
    assert report.render_relay_software("relay-a", lists) == data  # deterministic: no commit when nothing changed
    assert report.schema_name("relays/relay-a/software.json") == "status-software"


def test_the_same_packages_on_every_client_cost_one_line_each() -> None:
    packages = [(f"pkg-{i}", "1.0", "dpkg") for i in range(300)]
    data = report.render_relay_software("relay-a", {f"pc-{n:05d}": (packages, 0) for n in range(2000)})
    assert all(line.endswith('{"allBut": []}}},') or line.endswith('{"allBut": []}}}')
               for line in data.decode().splitlines()[1:-1])
    assert len(data) < 2000 * 12 + 300 * 80


@pytest.mark.parametrize(("doc", "problem"), [
    ({"relay": "relay-b", "clients": [], "omitted": {}, "software": []}, "names relay 'relay-b'"),
    ({"relay": "relay-a", "clients": ["pc-1"], "omitted": {}, "software": [
        {"name": "x", "source": "dpkg", "versions": {"1": {"clients": [1]}}}]}, "a client index beyond the 1 clients"),
    ({"relay": "relay-a", "clients": ["pc-1"], "omitted": {}, "software": [
        {"name": "x\u001b[2J", "source": "dpkg", "versions": {"1": {"clients": [0]}}}]}, "software[0].name"),
    ({"relay": "relay-a", "clients": ["pc-1"], "omitted": {"pc-2": 3}, "software": []}, "omitted.pc-2"),
    ({"relay": "relay-a", "clients": ["pc-1", "pc-1"], "omitted": {}, "software": []}, "lists a client twice"),
    ({"relay": "relay-a", "clients": ["PC 1"], "omitted": {}, "software": []}, "clients[0]"),
    ({"relay": "relay-a", "clients": [], "omitted": {}, "software": [
        {"name": "x", "source": "apt", "versions": {}}]}, "software[0].source"),
])
def test_a_hostile_software_json_is_refused_naming_the_file_and_field(doc: dict[str, Any], problem: str) -> None:
    with pytest.raises(report.ReportError, match="relays/relay-a/software.json") as caught:
        report.parse_relay_software(json.dumps(doc).encode(), "relays/relay-a/software.json")
    assert problem in str(caught.value)


# ------------------------------------------------------------------ status --software (search and output)

from reconciler.commands import status as status_cmd  # noqa: E402


def _found() -> dict[str, report.RelaySoftware]:
    kanto = report.parse_relay_software(report.render_relay_software("relay-kanto", {
        "pc-1": ([("Mozilla Firefox (x64 en-US)", "120.0.1", "registry"), ("7-Zip", "23.01", "registry")], 0),
        "pc-2": ([("Mozilla Firefox (x64 en-US)", "121.0", "registry"), ("evil\u202etxt.exe", "1", "registry")], 40),
    }), "relays/relay-kanto/software.json")
    osaka = report.parse_relay_software(report.render_relay_software("relay-osaka", {
        "pc-7": ([("firefox-esr", "115.5.0esr-1", "dpkg")], 0)}), "relays/relay-osaka/software.json")
    return {"relay-kanto": kanto, "relay-osaka": osaka}


@pytest.mark.parametrize(("pattern", "clients"), [
    ("firefox", ["pc-1", "pc-2", "pc-7"]),  # a part of the name, any case
    ("FIREFOX-ESR", ["pc-7"]),
    ("firefox*", ["pc-7"]),  # a glob matches the whole name
    ("*firefox*", ["pc-1", "pc-2", "pc-7"]),
    ("7-zip", ["pc-1"]),
    ("[0-9]-Zip", ["pc-1"]),
    ("chrome", []),
])
def test_software_search_is_case_insensitive_by_part_or_by_glob(pattern: str, clients: list[str]) -> None:
    hits, searched, cut = status_cmd.find_software(_found(), pattern)
    assert sorted(h.client for h in hits) == clients
    assert searched == 3 and cut == {"pc-2": 40}


def test_software_search_output_in_text_json_and_summary() -> None:
    hits, searched, cut = status_cmd.find_software(_found(), "firefox")
    text = status_cmd.render_software(hits, searched, cut, "firefox", "text", False).splitlines()
    assert [line.split("  ")[0] for line in text[1:4]] == ["firefox-esr"] + ["Mozilla Firefox (x64 en-US)"] * 2
    assert text[4] == "3 clients of 3 with a software inventory have software matching 'firefox'"
    assert text[5].startswith("the lists of 1 client were cut by their agents") and text[5].endswith("pc-2")
    doc = json.loads(status_cmd.render_software(hits, searched, cut, "firefox", "json", True))
    assert doc["versions"] == [
        {"name": "firefox-esr", "version": "115.5.0esr-1", "source": "dpkg", "clients": 1},
        {"name": "Mozilla Firefox (x64 en-US)", "version": "120.0.1", "source": "registry", "clients": 1},
        {"name": "Mozilla Firefox (x64 en-US)", "version": "121.0", "source": "registry", "clients": 1}]
    assert (doc["clientsSearched"], doc["clientsFound"], doc["truncatedLists"]) == (3, 3, {"pc-2": 40})
    evil, searched, cut = status_cmd.find_software(_found(), "evil")
    shown = status_cmd.render_software(evil, searched, cut, "evil", "json", False)
    assert "\u202e" not in shown and json.loads(shown)["matches"][0]["name"] == "evil\u202etxt.exe"
    assert "\u202e" not in status_cmd.render_software(evil, searched, cut, "evil", "text", False)
