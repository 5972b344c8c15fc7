"""The README's command reference and Quick start stay true to the code."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from reconciler.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _reference_lines() -> dict[str, str]:
    block = README.split("<!-- command-reference")[1].split("<!-- end command-reference -->")[0]
    lines = [line.strip() for line in block.splitlines() if line.strip().startswith("reconciler ")]
    return {line.split()[1]: line for line in lines}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_command_is_documented_and_nothing_else() -> None:
    assert sorted(_reference_lines()) == sorted(_subparsers())


def test_every_flag_of_every_command_is_documented_and_exists() -> None:
    reference = _reference_lines()
    for name, sub in _subparsers().items():
        actual = {opt for action in sub._actions for opt in action.option_strings if opt.startswith("--") and opt != "--help"}
        documented = set(re.findall(r"--[a-z][a-z-]*", reference[name]))
        assert documented == actual, f"{name}: README has {sorted(documented)}, parser has {sorted(actual)}"


def test_required_flags_are_shown_without_brackets() -> None:
    reference = _reference_lines()
    for name, sub in _subparsers().items():
        for action in sub._actions:
            long = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            if not long:
                continue
            # "[--origin-password-file" must not make --origin look optional
            optional_in_readme = re.search(rf"\[{re.escape(long[0])}[\s\]]", reference[name]) is not None
            assert optional_in_readme == (not action.required), f"{name} {long[0]}"


def test_choices_match() -> None:
    reference = _reference_lines()
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if action.choices and action.option_strings:
                shown = "|".join(str(c) for c in action.choices)
                assert f"{action.option_strings[0]} {shown}" in reference[name], f"{name} {action.option_strings[0]}"


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second() -> None:
    quick = README.split("## Quick start")[1].split("\n## ")[0]
    commands = re.findall(r"```sh\n(.+?)\n```", quick)
    assert len(commands) == 2
    assert commands[0].endswith("reconciler demo")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci


def test_every_row_reason_and_job_state_is_explained_in_the_status_section() -> None:
    from reconciler.plan import JobState, Reason
    section = README[README.index("## Reading status"):README.index("## Scaling out")]
    table = {cell for line in section.splitlines() if line.startswith("| ")
             for cell in re.findall(r"`([A-Za-z]+)`", line)}
    assert {r.value for r in Reason} <= table, sorted({r.value for r in Reason} - table)
    assert all(f"`{state.value}`" in section for state in JobState), \
        [s.value for s in JobState if f"`{s.value}`" not in section]
