"""One configuration surface: every hq/relay/agent flag from the command line, RECONCILER_<FLAG> or --config TOML."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from e2e_helpers import ENROLL_SECRET, RelayProcess, checkin_body
from e2e_helpers import Origin as E2EOrigin
from test_hq import Origin, git

from reconciler import cli, protocol, report, settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

REQUIRED = {
    "hq": ["--origin", "o.git", "--workdir", "w"],
    "relay": ["--name", "relay-kanto", "--origin", "o.git", "--workdir", "w", "--listen", "127.0.0.1:0"],
    "agent": ["--id", "pc-1", "--relay", "https://r", "--root", "d"],
}


def parse(argv: list[str], env: dict[str, str] | None = None) -> argparse.Namespace:
    """What ``reconciler ARGV`` would run with, in environment ``env`` (nothing of this process's)."""
    parser = cli.build_parser()
    with settings.parsing(parser):
        args = parser.parse_args(argv)
    settings.fill(parser, args, env or {})
    return args


def services() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.choices[name] for name in settings.SERVICES}


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "service.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


# (service, flag, environment value, TOML value, the parsed value both give): a number, a path,
# a repeatable flag and a switch for each service (the relay has no repeatable flag: a choice instead).
CASES = [
    ("hq", "--relay-timeout", "45", "45", 45.0),
    ("hq", "--heartbeat-secret-file", "/etc/r/hb", '"/etc/r/hb"', "/etc/r/hb"),
    ("hq", "--signing-key", "/k/a.key,/k/b.key", '["/k/a.key", "/k/b.key"]', ["/k/a.key", "/k/b.key"]),
    ("hq", "--insecure-http", "yes", "true", True),
    ("relay", "--publish-interval", "2.5", "2.5", 2.5),
    ("relay", "--inventory-interval", "0", "0", 0.0),
    ("relay", "--enroll-secret-file", "/etc/r/enroll", '"/etc/r/enroll"', "/etc/r/enroll"),
    ("relay", "--sqlite-synchronous", "full", '"full"', "FULL"),
    ("relay", "--require-approval", "1", "true", True),
    ("agent", "--output-tail", "120", "120", 120),
    ("agent", "--enroll-secret-file", "/etc/a/enroll", '"/etc/a/enroll"', "/etc/a/enroll"),
    ("agent", "--label", "dept=sales\nsite=kanto", '["dept=sales", "site=kanto"]',
     [("dept", "sales"), ("site", "kanto")]),
    ("agent", "--insecure-unsigned-actions", "true", "true", True),
]


@pytest.mark.parametrize("service,flag,env_value,toml_value,expected", CASES)
def test_a_flag_comes_from_the_environment_or_the_config_file(
        tmp_path: Path, service: str, flag: str, env_value: str, toml_value: str, expected: Any) -> None:
    dest = flag[2:].replace("-", "_")
    default = getattr(parse([service, *REQUIRED[service]]), dest)
    assert default != expected  # so each source below visibly changes it
    from_env = parse([service, *REQUIRED[service]], {settings.env_name(flag): env_value})
    assert getattr(from_env, dest) == expected
    config = toml(tmp_path, f"{flag[2:]} = {toml_value}\n")
    from_file = parse([service, *REQUIRED[service], "--config", config])
    assert getattr(from_file, dest) == expected
    from_env_named_file = parse([service, *REQUIRED[service]], {"RECONCILER_CONFIG": config})
    assert getattr(from_env_named_file, dest) == expected


def test_a_switch_set_false_in_the_environment_stays_off() -> None:
    args = parse(["hq", *REQUIRED["hq"]], {"RECONCILER_INSECURE_HTTP": "no", "RECONCILER_ONCE": "0"})
    assert (args.insecure_http, args.once) == (False, False)


def test_required_flags_come_from_the_environment_or_the_file(tmp_path: Path) -> None:
    args = parse(["agent"], {"RECONCILER_ID": "pc-9", "RECONCILER_RELAY": "https://relay", "RECONCILER_ROOT": "/r"})
    assert (args.id, args.relay, args.root) == ("pc-9", "https://relay", "/r")
    config = toml(tmp_path, 'name = "relay-osaka"\norigin = "o.git"\nworkdir = "w"\nlisten = "127.0.0.1:9"\n')
    args = parse(["relay", "--config", config])
    assert (args.name, args.origin, args.workdir, args.listen) == ("relay-osaka", "o.git", "w", "127.0.0.1:9")


def test_precedence_is_command_line_then_environment_then_file_then_default(tmp_path: Path) -> None:
    config = toml(tmp_path, 'poll-interval = 10\nlabel = ["from=file"]\n')
    base = ["agent", *REQUIRED["agent"], "--config", config]
    env = {"RECONCILER_POLL_INTERVAL": "20", "RECONCILER_LABEL": "from=env"}
    assert parse(["agent", *REQUIRED["agent"]]).poll_interval is None
    assert parse(base).poll_interval == 10.0
    assert parse(base, env).poll_interval == 20.0
    assert parse([*base, "--poll-interval", "30"], env).poll_interval == 30.0
    # A repeatable flag's list comes whole from the first source that gives it.
    assert parse(base).label == [("from", "file")]
    assert parse(base, env).label == [("from", "env")]
    assert parse([*base, "--label", "from=cli"], env).label == [("from", "cli")]
    # Given on the command line as its own default, a value still beats the environment.
    assert parse(["hq", *REQUIRED["hq"], "--poll-interval", "30"], {"RECONCILER_POLL_INTERVAL": "5"}).poll_interval \
        == 30.0


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    code = exited.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("variable,value,message", [
    ("RECONCILER_POLL_INTERVAL", "abc", "RECONCILER_POLL_INTERVAL: expected a number of seconds, got 'abc'"),
    ("RECONCILER_POLL_INTERVAL", "-3", "RECONCILER_POLL_INTERVAL: expected a positive number of seconds, got '-3'"),
    ("RECONCILER_INSECURE_HTTP", "maybe", "RECONCILER_INSECURE_HTTP: expected 1, true, yes, on, 0, false, no or "
                                          "off, got 'maybe'"),
    ("RECONCILER_SIGNATURE_POLICY", "some", "RECONCILER_SIGNATURE_POLICY: invalid choice: 'some'"),
])
def test_a_bad_environment_value_exits_2_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str,
        message: str) -> None:
    monkeypatch.setenv(variable, value)
    code, err = run_main(["hq", *REQUIRED["hq"]], capsys)
    assert code == 2
    assert f"reconciler hq: error: {message}" in err
    assert "Traceback" not in err


def test_a_bad_environment_item_of_a_repeatable_flag_names_the_variable(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RECONCILER_LABEL", "dept=sales,oops")
    code, err = run_main(["agent", *REQUIRED["agent"]], capsys)
    assert (code, err.splitlines()[-1]) == (2, "reconciler agent: error: RECONCILER_LABEL: expected K=V, got 'oops'")


@pytest.mark.parametrize("text,message", [
    ("pol-interval = 3\n", "unknown setting 'pol-interval'"),
    ('poll-interval = "abc"\n', "poll-interval: expected a number of seconds, got 'abc'"),
    ("insecure-http = 1\n", "insecure-http: expected true or false, got 1"),
    ("poll-interval = true\n", "poll-interval: expected a string or a number, got bool True"),
    ("[relay]\npoll-interval = 3\n", "unknown setting 'relay' (keys are the flags without dashes, at the top level)"),
    ("poll-interval = \n", "not valid TOML"),
    ("config = 'other.toml'\n", "unknown setting 'config'"),
])
def test_a_bad_config_file_exits_2_naming_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], text: str,
        message: str) -> None:
    for variable in [v for v in os.environ if v.startswith("RECONCILER_")]:
        monkeypatch.delenv(variable)
    config = toml(tmp_path, text)
    code, err = run_main(["relay", *REQUIRED["relay"], "--config", config], capsys)
    assert code == 2
    assert f"reconciler relay: error: config {config}: {message}" in err
    assert "Traceback" not in err


def test_a_missing_config_file_and_missing_required_flags_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for variable in [v for v in os.environ if v.startswith("RECONCILER_")]:
        monkeypatch.delenv(variable)
    code, err = run_main(["agent", *REQUIRED["agent"], "--config", str(tmp_path / "absent.toml")], capsys)
    assert (code, f"config {tmp_path / 'absent.toml'}: cannot read it" in err) == (2, True)
    monkeypatch.setenv("RECONCILER_ID", "pc-1")
    code, err = run_main(["agent", "--relay", "https://r"], capsys)
    assert code == 2
    assert "the following arguments are required: --root (on the command line, from the environment or in " \
           "--config)" in err


def test_every_service_option_names_its_variable_in_help_and_readme() -> None:
    section = README[README.index("### Configuration"):README.index("### The git webhook")]
    for name, sub in services().items():
        documented = section[section.index(f"- `{name}`: "):].split("\n- ")[0].split("\n\n")[0]
        listed = set(re.findall(r"`(RECONCILER_[A-Z_]+)`", documented))
        flags = [o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
        assert listed == {settings.env_name(f) for f in flags}, name
        usage = " ".join(sub.format_help().split())
        for action in sub._actions:
            long = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            if long:
                variable = "RECONCILER_" + long[0][2:].upper().replace("-", "_")
                assert f"(env: {variable})" in (action.help or ""), f"{name} {long[0]}"
                assert f"(env: {variable})" in usage, f"{name} {long[0]}"


def test_the_contrib_examples_are_valid_configurations() -> None:
    for name in settings.SERVICES:
        args = parse([name, "--config", str(ROOT / "contrib" / f"{name}.toml")])
        assert args.config.endswith(f"{name}.toml")
        unit = next((ROOT / "contrib").glob(f"reconciler-{name}*.service")).read_text(encoding="utf-8")
        assert f"contrib/{name}.toml" in unit


def test_services_run_on_the_environment_alone_and_on_a_config_file_alone(tmp_path: Path) -> None:
    """``reconciler hq --once`` with no flag: its origin, workdir, branch and --once from each source."""
    origin = Origin(tmp_path)
    git(origin.work, "push", "--quiet", "origin", "HEAD:release")
    release = origin.head
    origin.commit("on main only")
    assert origin.head != release
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    clean["PYTHONPATH"] = str(ROOT) + os.pathsep + clean.get("PYTHONPATH", "")

    def hq(argv: list[str], extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "reconciler", "hq", *argv], cwd=tmp_path,
                              env={**clean, **extra}, capture_output=True, text=True, timeout=120)

    proc = hq([], {"RECONCILER_ORIGIN": str(origin.bare), "RECONCILER_WORKDIR": str(tmp_path / "hq-env"),
                   "RECONCILER_BRANCH": "release", "RECONCILER_ONCE": "true"})
    assert proc.returncode == 0, proc.stderr
    accepted = report.parse_accepted(origin.files("status/hq")["accepted.yaml"])
    assert accepted.accepted_commit == release  # the branch from the environment, not main
    assert (tmp_path / "hq-env").is_dir()

    config = tmp_path / "hq.toml"
    config.write_text(f'origin = "{origin.bare}"\nworkdir = "{tmp_path / "hq-file"}"\nbranch = "main"\n'
                      f"once = true\n", encoding="utf-8")
    proc = hq(["--config", str(config)], {})
    assert proc.returncode == 0, proc.stderr
    accepted = report.parse_accepted(origin.files("status/hq")["accepted.yaml"])
    assert accepted.accepted_commit == origin.head  # main now, from the file
    assert (tmp_path / "hq-file").is_dir()


def test_exclusive_flags_are_exclusive_across_sources(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for variable in [v for v in os.environ if v.startswith("RECONCILER_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("RECONCILER_WEBHOOK_SECRET_FILE", "/etc/r/hook")
    code, err = run_main(["hq", *REQUIRED["hq"], "--insecure-unsigned-webhook"], capsys)
    assert code == 2
    assert "reconciler hq: error: --webhook-secret-file (from RECONCILER_WEBHOOK_SECRET_FILE) and " \
           "--insecure-unsigned-webhook (from the command line) exclude each other" in err
    # false in one source and set in another is no conflict
    args = parse(["hq", *REQUIRED["hq"], "--webhook-secret-file", "/f"], {"RECONCILER_INSECURE_UNSIGNED_WEBHOOK": "no"})
    assert (args.webhook_secret_file, args.insecure_unsigned_webhook) == ("/f", False)


def test_an_empty_variable_is_not_set(tmp_path: Path) -> None:
    config = toml(tmp_path, "insecure-http = true\npoll-interval = 12\n")
    args = parse(["hq", *REQUIRED["hq"], "--config", config],
                 {"RECONCILER_INSECURE_HTTP": "", "RECONCILER_POLL_INTERVAL": ""})
    assert (args.insecure_http, args.poll_interval) == (True, 12.0)


def test_a_relay_tells_agents_the_checkin_interval_of_its_config_file(tmp_path: Path) -> None:
    """``checkin-interval`` in the file beats the older RECONCILER_POLL_SECONDS (1 s here), as the README says."""
    origin = E2EOrigin(tmp_path)
    config = toml(tmp_path, "checkin-interval = 7\nsqlite-synchronous = \"full\"\n")
    relay = RelayProcess("relay-kanto", origin.url, tmp_path / "relay", extra_args=["--config", config])
    assert relay.extra_env["RECONCILER_POLL_SECONDS"] == "1.0"
    relay.start()
    try:
        reply = requests.post(f"{relay.url}/v1/clients/pc-1/checkin", json=checkin_body(),
                              headers={protocol.ENROLLMENT_HEADER: ENROLL_SECRET}, timeout=10)
        assert reply.status_code == 200, reply.text
        assert reply.json()["pollSeconds"] == 7
    finally:
        relay.stop()


@pytest.mark.parametrize("value,message", [
    ("-1", "expected a positive number of seconds, got '-1'"),
    ("nan", "expected a positive number of seconds, got 'nan'"),
    ("100000", "expected at most 86400 seconds, got '100000'"),
])
def test_a_bad_inventory_interval_exits_2(capsys: pytest.CaptureFixture[str], value: str, message: str) -> None:
    code, err = run_main(["relay", *REQUIRED["relay"], "--inventory-interval", value], capsys)
    assert code == 2
    assert f"argument --inventory-interval: {message}" in err
