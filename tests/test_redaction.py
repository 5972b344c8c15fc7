"""Secret masking in installer output: built-in shapes, operator patterns, and what a pattern may be."""

from __future__ import annotations

import re
import time

import pytest

from reconciler.redaction import (
    MAX_REDACT_INPUT,
    MAX_REDACT_PATTERN_LENGTH,
    compile_redact_patterns,
    redact_output,
    redact_pattern_problem,
    split_credentials,
)

PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7s3cr3t\nq2w3e4r5t6y7\n-----END RSA PRIVATE KEY-----"

# (output line, the secret in it, what must survive to say what happened)
SHAPES = [
    ("mysql: password=hunter2 rejected", "hunter2", "password="),
    ("PASSWORD: 'hunter2'", "hunter2", "PASSWORD"),
    ('{"db_password": "hunter2", "user": "app"}', "hunter2", '"user": "app"'),
    ("export API_TOKEN=tok_abc123def", "tok_abc123def", "API_TOKEN="),
    ("--client-secret=s3cr3tvalue next", "s3cr3tvalue", "next"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI", "aws_"),
    ("key id AKIAIOSFODNN7EXAMPLE in use", "AKIAIOSFODNN7EXAMPLE", "in use"),
    ("> Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz", "Authorization:"),
    ("curl: -H authorization: token ghp_0123456789", "ghp_0123456789", "curl"),
    ("sent Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "eyJhbGciOiJIUzI1NiJ9", "sent Bearer"),
    ("Cookie: session=abcdef0123", "abcdef0123", "Cookie:"),
    ("fetching https://deploy:pa55word@files.example/app.msi", "pa55word", "files.example/app.msi"),
    ("GET https://files.example/app.msi?sig=0xdeadbeef", "0xdeadbeef", "files.example/app.msi"),
    (f"loaded key\n{PEM}\ndone", "MIIEowIBAAKCAQEA7s3cr3t", "done"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA", "b3BlbnNzaC1rZXktdjEAAAAA", "BEGIN"),
]


@pytest.mark.parametrize(("line", "secret", "kept"), SHAPES, ids=[s[1][:12] for s in SHAPES])
def test_builtin_shapes_are_masked(line: str, secret: str, kept: str) -> None:
    masked = redact_output(line)
    assert secret not in masked and "***" in masked
    assert kept in masked


def test_ordinary_output_is_unchanged() -> None:
    text = "Extracting 41 files\ntoken bucket refilled\nkeyboard layout: us\nexit 0"
    assert redact_output(text) == text


def test_operator_patterns_mask_their_whole_match() -> None:
    patterns = compile_redact_patterns([r"LIC-[0-9A-F]{4}(?:-[0-9A-F]{4}){3}", r"(?i)serial\s*#\s*\d++"])
    masked = redact_output("license LIC-1A2B-3C4D-5E6F-7A8B ok; Serial # 99812 registered", patterns)
    assert masked == "license *** ok; *** registered"


def test_only_the_tail_is_scanned_and_a_cut_first_line_is_dropped() -> None:
    text = "x" * MAX_REDACT_INPUT + "\n" + "password=" + "y" * 10 + "\nlast line"
    masked = redact_output(text)
    assert len(masked) <= MAX_REDACT_INPUT + 1 and masked.endswith("password=***\nlast line")
    # a secret whose name was cut off at the scan window's start does not survive as a bare value
    cut = "a" * 100 + "password=hunter2-long-enough-to-be-cut\nok"
    shifted = "z" * (MAX_REDACT_INPUT - len(cut) + 10) + "\n" + cut
    assert "hunter2" not in redact_output(("q" * 20) + shifted[-MAX_REDACT_INPUT - 5:])


@pytest.mark.parametrize("pattern", [
    "(a+)+", r"(\w*\s?)*", "(?:x*)*y", "(a|b+)*c", "((ab)*c)+",
])
def test_nested_unbounded_repetition_is_refused(pattern: str) -> None:
    problem = redact_pattern_problem(pattern)
    assert problem is not None and "possessive" in problem


@pytest.mark.parametrize("pattern", [
    "LIC-[0-9]{4}", "(a+)++", "(?>a+)+", r"(?i)serial\s*#\s*\d+", "(ab|cd)+x", r"x{2,5}(?:y\d)+",
])
def test_safe_patterns_are_accepted(pattern: str) -> None:
    assert redact_pattern_problem(pattern) is None


@pytest.mark.parametrize("pattern", ["", "a*", "(?:)", "x?", "[", "(?P<n>a", "a" * (MAX_REDACT_PATTERN_LENGTH + 1)])
def test_bad_patterns_are_refused(pattern: str) -> None:
    assert redact_pattern_problem(pattern) is not None
    with pytest.raises(ValueError):
        compile_redact_patterns(["ok", pattern])


def test_hostile_output_is_masked_in_bounded_time() -> None:
    patterns = compile_redact_patterns([r"(?:a|b)+c", r"(a+)++x"])
    hostile = ("a" * 100_000 + "password" * 500 + "=" + "-----BEGIN PRIVATE KEY-----" * 100
               + "Bearer " * 200 + "token_" * 300)
    started = time.monotonic()
    masked = redact_output(hostile, patterns)
    assert time.monotonic() - started < 5.0
    assert len(masked) <= MAX_REDACT_INPUT + 1 and masked.endswith("PRIVATE KEY----- *** -----END PRIVATE KEY-----")


def test_compiled_patterns_are_python_re() -> None:
    assert all(isinstance(p, re.Pattern) for p in compile_redact_patterns(["abc", "d+e"]))


# ------------------------------------------------------------------ origin credentials


@pytest.mark.parametrize(("url", "expected"), [
    ("https://user:pa%40ss@git.example/x.git", ("https://git.example/x.git", "user", "pa@ss")),
    ("https://tok3n-abcdef@git.example:8443/x.git?a=b", ("https://git.example:8443/x.git?a=b", "tok3n-abcdef", None)),
    ("https://user:@git.example/x.git", ("https://git.example/x.git", "user", "")),
    ("ssh://git@git.example/x.git", ("ssh://git.example/x.git", "git", None)),
    ("https://git.example/x.git", ("https://git.example/x.git", None, None)),
    ("git@git.example:org/x.git", ("git@git.example:org/x.git", None, None)),
    ("/srv/git/x.git", ("/srv/git/x.git", None, None)),
    ("https://a:b@c@git.example/x.git", ("https://git.example/x.git", "a", "b@c")),
])
def test_split_credentials(url: str, expected: tuple[str, str | None, str | None]) -> None:
    assert split_credentials(url) == expected
