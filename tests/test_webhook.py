"""The git hook's guard: secret or explicit opt-out, signatures, timestamps, replays (plain values, no server)."""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.webhook import MAX_SKEW_SECONDS, HookGuard, HookRefused, sign

SECRET = b"hook-secret"
BODY = b'{"ref": "refs/heads/main", "after": "abc"}'
NOW = 1_800_000_000.0


def _environ(signature: str | None = None, timestamp: int | str | None = None, **headers: str) -> dict[str, Any]:
    environ: dict[str, Any] = {f"HTTP_{k.upper()}": v for k, v in headers.items()}
    if signature is not None:
        environ["HTTP_X_HUB_SIGNATURE_256"] = signature
    if timestamp is not None:
        environ["HTTP_X_RECONCILER_TIMESTAMP"] = str(timestamp)
    return environ


def _refused(guard: HookGuard, environ: dict[str, Any], body: bytes = BODY) -> int:
    with pytest.raises(HookRefused) as info:
        guard.check(environ, body)
    return info.value.status


def test_no_secret_refuses_every_hook_unless_insecure() -> None:
    assert _refused(HookGuard(None), _environ()) == 401
    assert _refused(HookGuard(None), _environ(sign(SECRET, BODY))) == 401
    assert HookGuard(None).mode == "refused"
    open_guard = HookGuard(None, insecure=True)
    open_guard.check(_environ(), BODY)
    open_guard.check(_environ(), BODY)  # nothing to recognise a replay by
    assert open_guard.mode == "unsigned (insecure)"
    assert HookGuard(SECRET, insecure=True).mode == "signed"


def test_a_signed_hook_is_accepted_once() -> None:
    guard = HookGuard(SECRET, clock=lambda: NOW)
    guard.check(_environ(sign(SECRET, BODY)), BODY)
    assert _refused(guard, _environ(sign(SECRET, BODY))) == 409
    other = BODY.replace(b"abc", b"def")  # the next push: another body, another signature
    guard.check(_environ(sign(SECRET, other)), other)


def test_a_delivery_id_is_accepted_once() -> None:
    guard = HookGuard(SECRET, clock=lambda: NOW)
    guard.check(_environ(sign(SECRET, BODY), x_gitea_delivery="d-1"), BODY)
    other = BODY.replace(b"abc", b"def")
    assert _refused(guard, _environ(sign(SECRET, other), x_gitea_delivery="d-1"), other) == 409


def test_wrong_or_missing_signatures_are_refused() -> None:
    guard = HookGuard(SECRET, clock=lambda: NOW)
    for environ in (_environ(), _environ("sha256=" + "0" * 64), _environ(sign(b"other", BODY)),
                    _environ(sign(SECRET, BODY + b" ")), _environ("md5=" + sign(SECRET, BODY)[7:])):
        assert _refused(guard, environ) == 401
    guard.check(_environ(sign(SECRET, BODY)), BODY)  # refusals are not remembered as deliveries


def test_timestamped_hooks_sign_the_timestamp_and_must_be_fresh() -> None:
    clock = [NOW]
    guard = HookGuard(SECRET, clock=lambda: clock[0])
    stamp = int(NOW)
    # the body alone signed, with a timestamp header: the timestamp is not covered, refused
    assert _refused(guard, _environ(sign(SECRET, BODY), stamp)) == 401
    guard.check(_environ(sign(SECRET, BODY, stamp), stamp), BODY)
    assert _refused(guard, _environ(sign(SECRET, BODY, stamp), stamp)) == 409
    clock[0] = NOW + 60  # the same body a minute later: a new timestamp, a new signature
    guard.check(_environ(sign(SECRET, BODY, stamp + 60), stamp + 60), BODY)
    for late in (stamp - MAX_SKEW_SECONDS - 1, stamp + 60 + MAX_SKEW_SECONDS + 1):
        assert _refused(guard, _environ(sign(SECRET, BODY, late), late)) == 401
    for bad in ("soon", "-5", "1e9", "9" * 40):
        assert _refused(guard, _environ(sign(SECRET, BODY), bad)) == 401


def test_the_replay_window_is_bounded() -> None:
    guard = HookGuard(SECRET, window=3, clock=lambda: NOW)
    bodies = [b"push %d" % i for i in range(5)]
    for body in bodies:
        guard.check(_environ(sign(SECRET, body)), body)
    assert _refused(guard, _environ(sign(SECRET, bodies[4])), bodies[4]) == 409
    guard.check(_environ(sign(SECRET, bodies[0])), bodies[0])  # forgotten: the window holds the newest only
