"""Loading good specs: the example repo into frozen dataclasses, and the
properties the rest of the system relies on (tree helpers, job revisions,
determinism)."""

from __future__ import annotations

import dataclasses
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.reach import index_topology
from reconciler.repo_tree import (
    DirectoryTree,
    load_repo,
    spec_files,
    tree_artifact_check,
)
from reconciler.resources import example_repo_dir
from reconciler.specs import (
    MAX_RERUN_SCOPE_CLIENTS,
    MAX_RERUN_SCOPE_RELAYS,
    NOT_REVISION_FIELDS,
    Artifact,
    Dependency,
    DestinationType,
    Installer,
    InstallerType,
    Job,
    JobType,
    Kind,
    Relay,
    Requirements,
    RerunScope,
    Specs,
    Topology,
    find_package,
    parse_repo,
    schema_for,
)

EXAMPLE = example_repo_dir()
JST = timezone(timedelta(hours=9))


@pytest.fixture(scope="module")
def specs() -> Specs:
    result = load_repo(EXAMPLE)
    assert result.errors == ()
    assert result.valid
    assert result.specs is not None
    return result.specs


def _job(specs: Specs, name: str) -> Job:
    (job,) = [j for j in specs.jobs if j.name == name]
    return job


def test_example_repo_loads_clean(specs: Specs) -> None:
    assert len(specs.packages) >= 5
    assert len(specs.jobs) >= 5
    assert [j.name for j in specs.jobs] == sorted(j.name for j in specs.jobs)
    assert [(p.name, p.spec_name) for p in specs.packages] == sorted((p.name, p.spec_name) for p in specs.packages)


def test_topology_relays_and_parents(specs: Specs) -> None:
    topology = specs.topology
    assert topology.headquarters == "hq-tokyo"
    parents = {r.name: r.parent for r in topology.relays}
    assert parents["relay-kanto"] == "hq-tokyo"
    assert parents["relay-yokohama"] == "relay-kanto"  # the nested site
    assert parents["relay-osaka"] == "hq-tokyo"
    assert parents["relay-fukuoka"] == "hq-tokyo"
    yokohama = next(r for r in topology.relays if r.name == "relay-yokohama")
    assert yokohama == Relay("relay-yokohama", "relay-kanto", (("region", "east"), ("site", "yokohama")))


def test_package_with_command_installer_requirements_and_dependency(specs: Specs) -> None:
    addin = find_package(specs, "office-addin", "2.4.0")
    assert addin is not None
    assert addin.spec_name == "office-addin-2.4.0"
    assert addin.artifact == Artifact(path="artifacts/office-addin-2.4.0")
    assert addin.installer == Installer(
        type=InstallerType.COMMAND,
        install=("${PYTHON}", "setup.py", "install"),
        uninstall=("${PYTHON}", "setup.py", "uninstall"),
        detect=(),
        timeout_seconds=300,
    )
    assert addin.requirements == Requirements(os=("windows",), min_free_disk_mb=500)
    assert addin.depends_on == (Dependency("vcredist", "14.30"),)
    assert addin.source == "packages/office-addin-2.4.0.yaml"
    assert len(addin.revision) == 64


def test_package_with_files_installer_gets_defaults(specs: Specs) -> None:
    sevenzip = find_package(specs, "7zip", "23.01")
    assert sevenzip is not None
    assert sevenzip.installer.type is InstallerType.FILES
    assert sevenzip.installer.install == ()
    assert sevenzip.installer.timeout_seconds == 600
    assert sevenzip.requirements == Requirements()
    assert find_package(specs, "7zip", "23.1") is None  # identity is the exact version text


def test_scheduled_job_has_an_aware_datetime(specs: Specs) -> None:
    teams = _job(specs, "install-teams-meeting")
    assert teams.not_before == datetime(2027, 4, 1, 9, 0, tzinfo=JST)
    assert teams.not_before == datetime(2027, 4, 1, 0, 0, tzinfo=timezone.utc)
    assert teams.not_after is None
    assert teams.destinations == ("relay-kanto", "relay-osaka", "relay-fukuoka")


def test_job_defaults_and_explicit_settings(specs: Specs) -> None:
    sevenzip = _job(specs, "install-7zip")
    assert sevenzip.job_type is JobType.INSTALL
    assert (sevenzip.package_name, sevenzip.package_version) == ("7zip", "23.01")
    assert sevenzip.destination_type is DestinationType.ALL_LOWER_CLIENTS
    assert (sevenzip.retry_limit, sevenzip.backoff_seconds) == (3, 60)
    assert (sevenzip.rerun, sevenzip.suspend, sevenzip.allow_downgrade) == (0, False, False)
    assert (sevenzip.max_concurrent, sevenzip.max_failures) == (None, None)

    vpn = _job(specs, "install-vpn-client")
    assert (vpn.retry_limit, vpn.backoff_seconds) == (2, 1)
    assert (vpn.max_concurrent, vpn.max_failures) == (10, "50%")

    addin = _job(specs, "install-office-addin")
    assert addin.destination_type is DestinationType.CLIENTS
    assert addin.destinations == ("pc-kanto-001", "pc-osaka-001")

    toolbar = _job(specs, "uninstall-legacy-toolbar")
    assert toolbar.job_type is JobType.UNINSTALL
    assert toolbar.package_version is None  # any version


def test_specs_are_frozen(specs: Specs) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        specs.jobs[0].rerun = 5  # type: ignore[misc]


def ancestors(topology: Topology, relay: str) -> tuple[str, ...]:
    return index_topology(topology).ancestors(relay)


def subtree(topology: Topology, relay: str) -> frozenset[str]:
    return index_topology(topology).subtree(relay)


def test_ancestors_and_subtree(specs: Specs) -> None:
    topology = specs.topology
    assert ancestors(topology, "relay-yokohama") == ("relay-yokohama", "relay-kanto")
    assert ancestors(topology, "relay-kanto") == ("relay-kanto",)
    assert ancestors(topology, "relay-osaka") == ("relay-osaka",)
    assert ancestors(topology, "no-such-relay") == ()
    assert subtree(topology, "relay-kanto") == frozenset({"relay-kanto", "relay-yokohama"})
    assert subtree(topology, "relay-yokohama") == frozenset({"relay-yokohama"})
    assert subtree(topology, "relay-fukuoka") == frozenset({"relay-fukuoka"})
    assert subtree(topology, "hq-tokyo") == frozenset() and subtree(topology, "not-a-relay") == frozenset()


def test_subtree_of_deep_chains_and_cycles() -> None:
    chain = Topology("hq-x", tuple(Relay(f"r{i}", f"r{i - 1}" if i else "hq-x") for i in range(1500)))
    assert subtree(chain, "r0") == frozenset(f"r{i}" for i in range(1500))
    assert subtree(chain, "r1498") == frozenset({"r1498", "r1499"})
    cycle = Topology("hq-x", (Relay("a", "b"), Relay("b", "a"), Relay("c", "hq-x")))  # never accepted, still ends
    assert subtree(cycle, "a") == frozenset({"a", "b"}) and subtree(cycle, "c") == frozenset({"c"})


def _with_job_text(files: dict[str, bytes], name: str, old: str, new: str) -> dict[str, bytes]:
    path = f"jobs/{name}.yaml"
    text = files[path].decode()
    assert old in text
    return {**files, path: text.replace(old, new).encode()}


def _revision(files: dict[str, bytes], name: str) -> str:
    result = parse_repo(files, tree_artifact_check(DirectoryTree(EXAMPLE)))
    assert result.errors == ()
    assert result.specs is not None
    return _job(result.specs, name).revision


REVISION_KEPT = [
    ("  rerun: 0\n", "  rerun: 3\n"),
    ("  rerun: 0\n", "  rerun: 0\n  suspend: true\n"),
    ("  rerun: 0\n", ""),  # rerun 0 and no rerun are the same
    ("# The western sites", "# The sites in the west"),  # comments are not the spec
    # which rows a rerun covers is not what the job wants: every client keeps its history
    ("  rerun: 0\n", "  rerun: 1\n  rerunScope: {relays: [relay-osaka]}\n"),
    ("  rerun: 0\n", "  rerun: 1\n  rerunScope:\n    clients: [pc-1, pc-2]\n    repair: true\n"),
]
REVISION_CHANGED = [
    ("limit: 2", "limit: 4"),
    ("backoffSeconds: 1", "backoffSeconds: 2"),
    ("destinations: [relay-osaka, relay-fukuoka]", "destinations: [relay-osaka]"),
    ('maxFailures: "50%"', 'maxFailures: "10%"'),
    ("  rerun: 0\n", "  rerun: 0\n  allowDowngrade: true\n"),
    ("  rerun: 0\n", '  rerun: 0\n  schedule:\n    notBefore: "2027-01-01T00:00:00Z"\n'),
]


@pytest.mark.parametrize(("old", "new"), REVISION_KEPT)
def test_job_revision_ignores_rerun_and_suspend(old: str, new: str) -> None:
    files = spec_files(DirectoryTree(EXAMPLE))
    before = _revision(files, "install-vpn-client")
    after = _revision(_with_job_text(files, "install-vpn-client", old, new), "install-vpn-client")
    assert after == before


@pytest.mark.parametrize(("old", "new"), REVISION_CHANGED)
def test_job_revision_changes_with_any_other_edit(old: str, new: str) -> None:
    files = spec_files(DirectoryTree(EXAMPLE))
    before = _revision(files, "install-vpn-client")
    after = _revision(_with_job_text(files, "install-vpn-client", old, new), "install-vpn-client")
    assert after != before


def test_rerun_and_suspend_are_still_read(specs: Specs) -> None:
    files = _with_job_text(spec_files(DirectoryTree(EXAMPLE)), "install-vpn-client", "  rerun: 0\n", "  rerun: 2\n  suspend: true\n")
    result = parse_repo(files, tree_artifact_check(DirectoryTree(EXAMPLE)))
    assert result.specs is not None
    vpn = _job(result.specs, "install-vpn-client")
    assert (vpn.rerun, vpn.suspend) == (2, True)


def test_rerun_scope_is_read_as_written() -> None:
    files = _with_job_text(spec_files(DirectoryTree(EXAMPLE)), "install-vpn-client", "  rerun: 0\n",
                           "  rerun: 3\n  rerunScope:\n    relays: [relay-fukuoka]\n    clients: [pc-9, pc-1]\n"
                           "    repair: true\n")
    result = parse_repo(files, tree_artifact_check(DirectoryTree(EXAMPLE)))
    assert result.specs is not None
    vpn = _job(result.specs, "install-vpn-client")
    assert (vpn.rerun, vpn.rerun_scope) == (3, RerunScope(relays=("relay-fukuoka",), clients=("pc-9", "pc-1"),
                                                          repair=True))
    assert _job(specs_of_example(), "install-vpn-client").rerun_scope is None


@pytest.mark.parametrize(("destinations", "scope", "outside"), [
    ("[relay-osaka, relay-fukuoka]", "[relay-fukuoka]", []),
    ("[relay-yokohama]", "[relay-kanto]", []),  # the scope relay's subtree holds the destination
    ("[relay-kanto]", "[relay-yokohama]", []),  # a nested relay of the destination
    ("[relay-osaka, relay-fukuoka]", "[relay-kanto, relay-osaka, relay-yokohama]",
     ["relay-kanto", "relay-yokohama"]),
    ("[relay-yokohama]", "[relay-osaka]", ["relay-osaka"]),
])
def test_rerun_scope_relays_must_hold_clients_of_the_job(destinations: str, scope: str, outside: list[str]) -> None:
    files = _with_job_text(spec_files(DirectoryTree(EXAMPLE)), "install-vpn-client",
                           "destinations: [relay-osaka, relay-fukuoka]", f"destinations: {destinations}")
    files = _with_job_text(files, "install-vpn-client", "  rerun: 0\n",
                           f"  rerun: 1\n  rerunScope: {{relays: {scope}}}\n")
    result = parse_repo(files, tree_artifact_check(DirectoryTree(EXAMPLE)))
    found = [e.message for e in result.errors]
    assert found == [f"/spec/rerunScope/relays/{scope.strip('[]').split(', ').index(name)}: relay {name!r} is outside "
                     f"this job's destinations ({destinations.strip('[]')} and the relays below them), so the rerun "
                     f"would do nothing there" for name in outside]


def specs_of_example() -> Specs:
    result = load_repo(EXAMPLE)
    assert result.specs is not None
    return result.specs


def test_rerun_scope_list_bounds_are_the_schemas() -> None:
    scope = schema_for(Kind.JOB)["properties"]["spec"]["properties"]["rerunScope"]["properties"]
    assert scope["relays"]["maxItems"] == MAX_RERUN_SCOPE_RELAYS
    assert scope["clients"]["maxItems"] == MAX_RERUN_SCOPE_CLIENTS
    assert "rerunScope" in NOT_REVISION_FIELDS


def test_parse_repo_is_deterministic() -> None:
    files = spec_files(DirectoryTree(EXAMPLE))
    check = tree_artifact_check(DirectoryTree(EXAMPLE))
    first = parse_repo(files, check)
    again = parse_repo(dict(files), check)
    reversed_order = parse_repo(dict(reversed(list(files.items()))), check)
    assert first == again == reversed_order
    assert first.specs is not None
    assert repr(first.specs) == repr(reversed_order.specs)


def test_load_repo_is_parse_repo_on_the_directory(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(EXAMPLE, copy)
    (copy / "README.md").write_text("ignored\n", encoding="utf-8")
    (copy / "jobs" / "notes.txt").write_text("not a spec: ignored\n", encoding="utf-8")
    from_disk = load_repo(copy)
    from_files = parse_repo(spec_files(DirectoryTree(copy)), tree_artifact_check(DirectoryTree(copy)))
    assert from_disk == from_files
    assert from_disk.specs == load_repo(EXAMPLE).specs


def test_load_repo_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_repo(tmp_path / "nope")
