"""Command line: argument parsing only.

Every subcommand of DESIGN section 7 is declared here and dispatched to a
``main(args) -> int`` function in the module that owns the work, imported
lazily so ``reconciler validate`` does not pay for git or HTTP imports.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import io
import math
import os
import sys
import urllib.parse
from collections.abc import Sequence

from reconciler import settings

# Longest span a duration option takes (about three years): a datetime plus it never overflows.
MAX_DURATION_SECONDS = 10**8

# subcommand -> module whose main(args) runs it
_HANDLERS: dict[str, str] = {
    "validate": "reconciler.commands.validate",
    "plan": "reconciler.commands.plan",
    "hq": "reconciler.hq",
    "relay": "reconciler.relay.service",
    "agent": "reconciler.agent.agent",
    "status": "reconciler.commands.status",
    "rerun": "reconciler.commands.rerun",
    "demo": "reconciler.commands.demo",
    "clients": "reconciler.commands.clients",
    "keygen": "reconciler.commands.keygen",
    "init": "reconciler.commands.init",
    "schemas": "reconciler.commands.schemas",
}


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
    return key, value


def _positive_number(text: str, unit: str, most: float | None = None) -> float:
    """A finite number above 0 (and at most ``most``) of ``unit``, or argparse's error naming the unit."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of {unit}, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of {unit}, got {text!r}")
    if most is not None and value > most:
        raise argparse.ArgumentTypeError(f"expected at most {most:g} {unit}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _positive_number(text, "seconds")


def _zero_or_seconds(text: str, most: float) -> float:
    """0 (the flag's "every time") or a positive number of seconds of at most ``most``."""
    if text.strip() in ("0", "0.0"):
        return 0.0
    return _positive_number(text, "seconds", most)


def _inventory_interval(text: str) -> float:
    """Seconds between refreshes of per-client detail: 0 (every pass) to a day."""
    return _zero_or_seconds(text, 86400)


def _detect_interval(text: str) -> float:
    """Seconds between detections: 0 (every check-in) up to a week."""
    return _zero_or_seconds(text, 7 * 86400)


def _checkin_interval(text: str) -> float:
    """A positive number of seconds of at most a day (agents refuse a longer interval)."""
    return _positive_number(text, "seconds", 86400)


def _duration(text: str) -> float:
    """A positive number of seconds a datetime can hold as a span (at most about three years)."""
    return _positive_number(text, "seconds", MAX_DURATION_SECONDS)


def _days(text: str) -> float:
    """A positive number of days, at most ten years."""
    return _positive_number(text, "days", 3650)


def _software_minutes(text: str) -> float:
    """Minutes between software inventory collections: 1 to 10080 (a week)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes, got {text!r}") from None
    if not 1.0 <= value <= 10080.0:
        raise argparse.ArgumentTypeError(f"expected 1 to 10080 minutes (a week), got {text}")
    return value


def _history_days(text: str) -> float:
    """Days of status history to keep: 0 keeps all, else a positive number of at most ten years."""
    if text.strip() in ("0", "0.0"):
        return 0.0
    return _positive_number(text, "days", 3650)


def _whole_number(text: str, unit: str) -> int:
    """An integer of ``unit``, or argparse's error naming the unit (the caller checks the range)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of {unit}, got {text!r}") from None


def _history_commits(text: str) -> int:
    """Status commits to keep: 0 keeps all, else 10 to 10,000,000."""
    value = _whole_number(text, "commits")
    if value != 0 and not 10 <= value <= 10_000_000:
        raise argparse.ArgumentTypeError(f"expected 0 (keep all) or 10 to 10000000 commits, got {text!r}")
    return value


def _status_history_options(p: argparse.ArgumentParser, ref: str) -> None:
    p.add_argument("--status-history-days", type=_history_days, default=30.0, metavar="DAYS",
                   help=f"keep this many days of {ref} history; older commits are squashed by this writer once "
                        "the history is a quarter past the bound (0: keep all; default: 30)")
    p.add_argument("--status-history-commits", type=_history_commits, default=10_000, metavar="N",
                   help=f"keep at most N commits of {ref} history, squashing older ones likewise (0: keep all; "
                        "default: 10000)")


def _output_tail(text: str) -> int:
    """A number of characters from 0 to 8000 (the agent keeps at most that much of a command's output)."""
    value = _whole_number(text, "characters")
    if not 0 <= value <= 8000:
        raise argparse.ArgumentTypeError(f"expected 0 to 8000 characters, got {text!r}")
    return value


def _origin_password_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--origin-password-file", metavar="F",
                   help="password or access token for an HTTP(S) origin, sent to git through its environment, "
                        "never a command line (default: $RECONCILER_ORIGIN_PASSWORD; the user name comes from "
                        "the URL, else 'git')")


def _webhook_options(p: argparse.ArgumentParser) -> None:
    """``--webhook-secret-file`` and ``--insecure-unsigned-webhook``: without either, hooks are refused (401)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--webhook-secret-file", metavar="F",
                       help="HMAC-SHA256 secret git hosts sign POST /v1/hooks/git with; without it (or "
                            "--insecure-unsigned-webhook) every hook is refused with 401")
    group.add_argument("--insecure-unsigned-webhook", action="store_true",
                       help="accept unsigned hooks on POST /v1/hooks/git (anyone who can reach the port can "
                            "make this service fetch)")


def _server_tls_options(p: argparse.ArgumentParser) -> None:
    """``--tls-cert``/``--tls-key`` (HTTPS), ``--tls-client-ca`` (mutual TLS), ``--insecure-http`` (plain HTTP)."""
    p.add_argument("--tls-cert", metavar="F", help="PEM certificate (chain) to serve HTTPS with; needs --tls-key")
    p.add_argument("--tls-key", metavar="F", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", metavar="F",
                   help="require client certificates issued by the CA(s) in this PEM file (mutual TLS)")
    p.add_argument("--insecure-http", action="store_true",
                   help="serve plain HTTP without --tls-cert (and accept http:// URLs): unencrypted, logged as a "
                        "warning")


def _client_tls_options(p: argparse.ArgumentParser, towards: str) -> None:
    """``--ca-file`` and ``--client-cert``/``--client-key`` for the connections to ``towards``."""
    p.add_argument("--ca-file", metavar="F",
                   help=f"PEM file of the CA(s) that {towards} certificates must be issued by (default: the "
                        "system's trust store)")
    p.add_argument("--client-cert", metavar="F", help=f"PEM client certificate to present to {towards} (mutual TLS)")
    p.add_argument("--client-key", metavar="F", help="PEM private key of --client-cert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reconciler",
        description="GitOps software distribution to all lower clients of a relay hierarchy.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="validate the specs of a desired-state repo (CI)")
    p.add_argument("repo", nargs="?", metavar="REPO",
                   help="repo directory (default: the nearest one at or above . that holds topology.yaml)")
    p.add_argument("--format", choices=["text", "json", "github"], default="text",
                   help="text lines, a JSON document, or GitHub workflow annotations")
    p.add_argument("--allowed-signers", metavar="FILE",
                   help="also check that commits are signed by a key of this SSH allowed-signers file (REPO must "
                        "be in a git work tree)")
    p.add_argument("--verify-commits", metavar="REV|BASE..TIP",
                   help="with --allowed-signers: the commit to check, or every commit of a range (default: HEAD)")

    p = sub.add_parser("plan", help="preview what every client would do (blast radius)")
    p.add_argument("repo", nargs="?", metavar="REPO",
                   help="repo directory (default: the nearest one at or above . that holds topology.yaml)")
    p.add_argument("--inventory", required=True, action="append", metavar="FILE",
                   help='JSON file {"clients": [{"id", "relay", "facts", "labels", "installed"}]}, or a relay\'s '
                        'published inventory.json; repeatable (the files are merged)')
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format")
    p.add_argument("--now", metavar="RFC3339", help="evaluate schedules at this time (default: now)")

    p = sub.add_parser("hq", help="run the headquarters reconciler")
    p.add_argument("--origin", required=True, metavar="URL", help="git origin holding main and the status refs")
    p.add_argument("--workdir", required=True, metavar="DIR", help="HQ's working directory")
    _origin_password_option(p)
    p.add_argument("--branch", default="main", help="branch holding the specs (default: main)")
    p.add_argument("--poll-interval", type=_positive_float, default=30.0, metavar="S",
                   help="fallback poll interval in seconds (default: 30)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="serve /healthz, the git webhook and the relays' heartbeats here (without it HQ reports "
                        "no relay liveness)")
    _server_tls_options(p)
    _webhook_options(p)
    p.add_argument("--heartbeat-secret-file", metavar="F",
                   help="HMAC-SHA256 secret relays sign their heartbeats with (unsigned ones are then refused)")
    p.add_argument("--relay-timeout", type=_positive_float, default=300.0, metavar="S",
                   help="a relay with no heartbeat for S seconds is published as lost (default: 300)")
    p.add_argument("--notification-secrets-dir", metavar="DIR",
                   help="directory of the HMAC-SHA256 keys the topology's spec.notifications name in secretFile; "
                        "without it HQ sends no notifications")
    p.add_argument("--ui-token-file", metavar="F",
                   help="require this read token for the web view at / and /ui/ (Authorization: Bearer, or HTTP "
                        "Basic with the token as password); without it the view is open to whoever reaches --listen")
    p.add_argument("--allowed-signers", metavar="FILE",
                   help="accept a main commit only when it is signed by a key of this SSH allowed-signers file "
                        "(as git's gpg.ssh.allowedSignersFile); an unsigned one is rejected like invalid specs")
    p.add_argument("--signature-policy", choices=["head", "all"], default=None,
                   help="with --allowed-signers: head (default) checks the tip of main, all also every commit "
                        "it brings in since the accepted one")
    p.add_argument("--signing-key", action="append", default=[], metavar="F",
                   help="Ed25519 private key (reconciler keygen) to sign the manifest of each accepted commit "
                        "with; repeatable (every key signs: a rotation); agents with --trust-key need it")
    p.add_argument("--next-key", action="append", default=[], metavar="F",
                   help="public key HQ will sign with next: listed in the manifest, agents learn to trust it "
                        "(repeatable)")
    p.add_argument("--revoke-key", action="append", default=[], metavar="F",
                   help="public key agents must stop trusting, even their own --trust-key (repeatable)")
    _status_history_options(p, "status/hq")
    p.add_argument("--once", action="store_true", help="do one full pass and exit")

    p = sub.add_parser("relay", help="run a relay reconciler serving its clients")
    p.add_argument("--name", required=True, help="this relay's name in the topology")
    p.add_argument("--origin", required=True, metavar="URL", help="git origin")
    p.add_argument("--workdir", required=True, metavar="DIR", help="relay's working directory (SQLite, cache)")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address of the client API")
    _server_tls_options(p)
    _client_tls_options(p, "the parent relay's and HQ's")
    _origin_password_option(p)
    p.add_argument("--parent-url", metavar="URL", help="parent relay to fetch artifacts from first")
    p.add_argument("--poll-interval", type=_positive_float, default=30.0, metavar="S",
                   help="fallback poll interval for status/hq in seconds (default: 30)")
    p.add_argument("--checkin-interval", type=_checkin_interval, metavar="S",
                   help="seconds between check-ins told to agents, at most a day (default: $RECONCILER_POLL_SECONDS, "
                        "else 30)")
    p.add_argument("--publish-interval", type=_positive_float, default=60.0, metavar="S",
                   help="publish status/<relay> at most this often, in seconds (default: 60: at most one push a "
                        "minute per relay, as hosted git services expect)")
    p.add_argument("--inventory-interval", type=_inventory_interval, default=900.0, metavar="S",
                   help="refresh the per-client detail of status/<relay> (inventory.json, software.json, client "
                        "counts) at most this often, in seconds; job rows are never held back (default: 900; "
                        "0: at every pass)")
    _status_history_options(p, "status/<relay>")
    p.add_argument("--offline-after", type=_duration, metavar="S",
                   help="a client not heard from for this long is offline: it holds no rollout slot and its "
                        "waiting rows say clientOffline (default: 3 check-in intervals + 30 s)")
    p.add_argument("--retire-after", type=_days, default=30.0, metavar="DAYS",
                   help="a client not heard from for this many days is retired: no longer counted or planned, "
                        "listed in relay.yaml; a check-in brings it back (default: 30)")
    p.add_argument("--hq-url", metavar="URL",
                   help="HQ's --listen address: send it a heartbeat every --heartbeat-interval (none without it)")
    p.add_argument("--heartbeat-interval", type=_positive_float, default=60.0, metavar="S",
                   help="seconds between heartbeats to HQ (default: 60)")
    p.add_argument("--heartbeat-secret-file", metavar="F",
                   help="HMAC-SHA256 secret to sign heartbeats with (HQ's --heartbeat-secret-file)")
    _webhook_options(p)
    p.add_argument("--enroll-secret-file", metavar="F",
                   help="enrolment secret: only agents presenting it (their --enroll-secret-file) register")
    p.add_argument("--open-enrollment", action="store_true",
                   help="let any caller register a client id (trust on first use); a relay needs this or "
                        "--enroll-secret-file")
    p.add_argument("--require-approval", action="store_true",
                   help="new clients wait for `reconciler clients approve ID --workdir DIR` before they get work")
    p.add_argument("--child-secret-file", metavar="F",
                   help="secret child relays present (their --parent-secret-file) to download artifacts from here")
    p.add_argument("--parent-secret-file", metavar="F",
                   help="secret to present to --parent-url for artifacts (the parent's --child-secret-file)")
    p.add_argument("--sqlite-synchronous", type=str.upper, choices=["NORMAL", "FULL", "EXTRA"], default=None,
                   help="SQLite's synchronous mode: FULL keeps the last commits through a power loss, at some "
                        "write speed (default: NORMAL)")

    p = sub.add_parser("agent", help="run the agent on a client machine")
    p.add_argument("--id", required=True, help="this client's id")
    p.add_argument("--relay", required=True, metavar="URL", help="the relay's base URL (https://...)")
    _client_tls_options(p, "the relay's")
    p.add_argument("--insecure-http", action="store_true",
                   help="accept an http:// relay URL: unencrypted and unauthenticated")
    p.add_argument("--root", required=True, metavar="DIR", help="agent root: packages, receipts, journal, token")
    p.add_argument("--label", action="append", type=_key_value, default=[], metavar="K=V",
                   help="a label reported to the relay (repeatable)")
    p.add_argument("--fact", action="append", type=_key_value, default=[], metavar="K=V",
                   help="override a reported fact: os, arch, hostname, freeDiskMB, bootId (repeatable)")
    p.add_argument("--poll-interval", type=_positive_float, metavar="S",
                   help="seconds between check-ins (default: what the relay says)")
    p.add_argument("--output-tail", type=_output_tail, default=2000, metavar="CHARS",
                   help="characters of an installer's output (its end, secrets masked) kept in the result sent "
                        "to the relay (default: 2000, at most 8000)")
    p.add_argument("--rehash-interval", type=_positive_float, default=86400.0, metavar="S",
                   help="seconds between full re-hashes of installed files packages; check-ins in between "
                        "compare file sizes and times and re-hash only what changed (default: 86400, a day)")
    p.add_argument("--detect-interval", type=_detect_interval, default=600.0, metavar="S",
                   help="seconds a package's detection (its detect command or rule, dpkg or rpm, the file check of "
                        "a files package) is reused before it is asked again; an action for the package asks "
                        "again at once; 0: at every check-in (default: 600)")
    p.add_argument("--enroll-secret-file", metavar="F",
                   help="the relay's enrolment secret, presented to register (and to get a new token after a rekey)")
    p.add_argument("--trust-key", action="append", default=[], metavar="F",
                   help="HQ's public key (reconciler keygen): run only actions HQ's signed manifest covers "
                        "(repeatable); an agent needs this or --insecure-unsigned-actions")
    p.add_argument("--insecure-unsigned-actions", action="store_true",
                   help="run whatever the relay sends, unverified (a test bench; never a fleet)")
    p.add_argument("--dpkg-root", metavar="DIR",
                   help="run dpkg and dpkg-query with --root=DIR (a sandbox with its own package database) for "
                        "deb packages (default: the system's dpkg)")
    p.add_argument("--rpm-root", metavar="DIR",
                   help="run rpm with --root DIR --dbpath /var/lib/rpm (a sandbox with its own database) for rpm "
                        "packages (default: the system's rpm)")
    p.add_argument("--software-inventory", choices=["auto", "off"], default="auto",
                   help="report the OS's installed software (dpkg, rpm, the Windows registry's Uninstall keys or "
                        "pkgutil, whichever this machine has) to the relay; off: do not (default: auto)")
    p.add_argument("--software-interval", type=_software_minutes, default=60.0, metavar="MINUTES",
                   help="collect the software inventory at most this often, and after actions ran; it is sent "
                        "only when it changed (default: 60)")
    p.add_argument("--reboot-command", metavar="ARGV",
                   help="command (split like a shell, run without one) that reboots this client when an action "
                        "with reboot: ifRequired succeeds and asks for a reboot; {packages} is replaced by the "
                        "package names; '' turns it off (default: shutdown -r +1 ..., on Windows "
                        "shutdown /r /t 60 /c ...)")
    p.add_argument("--no-reboot", action="store_true",
                   help="never run the reboot command (clients wait for a reboot by other means)")
    p.add_argument("--once", action="store_true", help="check in, run the actions, report, and exit")

    p = sub.add_parser("clients", help="list, approve, forget or rekey a relay's clients (on the relay host)")
    p.add_argument("action", choices=["list", "approve", "forget", "rekey"], metavar="list|approve|forget|rekey",
                   help="list: the clients and their state; approve: admit a client waiting for approval; "
                        "forget: delete a registration and its history; rekey: revoke a token (history kept)")
    p.add_argument("id", nargs="?", metavar="ID", help="the client (optional for list: then its events too)")
    p.add_argument("--workdir", required=True, metavar="DIR", help="the relay's --workdir")
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format of list")

    p = sub.add_parser("status", help="show the HQ report from the status refs")
    p.add_argument("--origin", metavar="URL", help="git origin (default: the remote the current clone fetches from: its branch's upstream, else origin)")
    _origin_password_option(p)
    p.add_argument("--job", metavar="NAME", help="show only this job")
    p.add_argument("--format", choices=["text", "json", "markdown"], default="text", help="output format")
    p.add_argument("--wait", action="store_true",
                   help="wait until the commit is evaluated and rolled out; exit 0 all good, 1 settled with "
                        "failures, 2 error, 3 commit rejected, 4 timeout")
    p.add_argument("--commit", metavar="SHA",
                   help="with --wait: the commit to wait for (default: the origin's current main)")
    p.add_argument("--timeout", type=_positive_float, default=300.0, metavar="S",
                   help="give up waiting after S seconds (default: 300)")
    p.add_argument("--inventory", metavar="FILE",
                   help="also write every relay's inventory, merged, to FILE for `reconciler plan --inventory` "
                        "(-: standard output, instead of the report)")
    p.add_argument("--software", metavar="NAME",
                   help="instead of the report, list the clients whose OS lists software matching NAME, with "
                        "version, source and relay (case-insensitive; a part of the name, or a glob such as "
                        "'firefox*'); exit 1 when none has it")
    p.add_argument("--summary", action="store_true",
                   help="with --software: how many clients have each version, instead of one line per client")

    p = sub.add_parser("rerun", help="raise spec.rerun of a job to re-run its failed clients",
                       description="Raise spec.rerun of a job in its file, keeping comments, and print the diff to "
                                   "commit through a pull request. Without --relay and --client every Failed client "
                                   "runs again; with them (written as spec.rerunScope, replacing an earlier scope) "
                                   "only the Failed clients of those relays, of relays nested below them, and those "
                                   "clients.")
    p.add_argument("job", metavar="JOB", help="job name (metadata.name)")
    p.add_argument("repo", nargs="?", metavar="REPO",
                   help="repo directory (default: the nearest one at or above . that holds topology.yaml)")
    p.add_argument("--relay", action="append", metavar="R",
                   help="re-run only the Failed clients of relay R and of the relays nested below it (repeatable)")
    p.add_argument("--client", action="append", metavar="C",
                   help="re-run only the Failed row of client id C (repeatable)")
    p.add_argument("--repair", action="store_true",
                   help="also reinstall the package on the --client clients where it is installed already "
                        "(Succeeded), once for this rerun; needs --client")

    p = sub.add_parser("keygen", help="make an Ed25519 key pair for HQ's manifest signatures")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="private key file to write (owner-only); the public key goes beside it as .pub")
    p.add_argument("--force", action="store_true", help="replace existing files")

    p = sub.add_parser("init", help="scaffold a desired-state repo that validates, with schemas, CI and a hook",
                       description="Write a topology (HQ and one relay), a package with its artifact, a job, the "
                                   "spec schemas of this version in schemas/ (the spec files' yaml-language-server "
                                   "modelines point there), a CI workflow and a pre-commit configuration pinned to "
                                   "this version, and a README. A DIR that already holds specs is refused (exit 2); "
                                   "other files that exist are kept.")
    p.add_argument("dir", nargs="?", default=".", metavar="DIR", help="directory of the new repo (default: .)")

    p = sub.add_parser("schemas", help="write the spec schemas of this version into a directory")
    p.add_argument("action", choices=["export"], metavar="export",
                   help="export: write (refresh) topology, package and job .schema.json into DIR")
    p.add_argument("dir", metavar="DIR", help="directory to write them into, e.g. a repo's schemas/")

    p = sub.add_parser("demo", help="run HQ, relays and agents locally on the example repo")
    p.add_argument("--clients", type=int, default=12, metavar="N", help="number of agents (default: 12)")
    p.add_argument("--workdir", metavar="DIR", help="working directory (default: a new temp dir)")
    p.add_argument("--format", choices=["text", "json"], default="text", help="format of the final report")

    for service in settings.SERVICES:
        settings.install(sub.choices[service])
    return parser


def _exec_without_url_password(args: argparse.Namespace) -> None:
    """Start this command again with the password of ``--origin`` moved from the URL into the environment.

    A process cannot portably rewrite its own argv, and ``ps`` shows argv to
    every user: so a ``https://user:password@host/repo.git`` given anyway
    makes the command exec itself (same process id) with
    ``https://user@host/repo.git`` and the password in
    ``$RECONCILER_ORIGIN_PASSWORD``, after saying how to give it properly.
    POSIX only; elsewhere the warning of :func:`url_credentials_warning` stays.
    """
    origin = getattr(args, "origin", None)
    if os.name != "posix" or not isinstance(origin, str) or not origin.lower().startswith(("http://", "https://")):
        return  # decided before any import: `validate` and the agent pay nothing for this
    from reconciler.gitstore import ORIGIN_PASSWORD_ENV
    from reconciler.redaction import redact_url, split_credentials
    if getattr(args, "origin_password_file", None) or os.environ.get(ORIGIN_PASSWORD_ENV):
        return  # a password given properly wins; the URL's is ignored and warned about later
    if not any(a in (origin, f"--origin={origin}") for a in sys.argv[1:]):
        return  # from the environment or --config: no command line shows it
    bare, user, password = split_credentials(origin)
    if user is None or password is None:
        return
    scheme, rest = bare.split("://", 1)
    clean = f"{scheme}://{urllib.parse.quote(user, safe='')}@{rest}"
    argv = [clean if a == origin else f"--origin={clean}" if a == f"--origin={origin}" else a for a in sys.argv[1:]]
    print(f"reconciler {args.command}: the password in --origin {redact_url(origin)} is moved to "
          f"${ORIGIN_PASSWORD_ENV} and the command restarted so that no command line shows it; give it with "
          f"--origin-password-file F or ${ORIGIN_PASSWORD_ENV} instead", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "reconciler", *argv],
              {**os.environ, ORIGIN_PASSWORD_ENV: password})


def main(argv: Sequence[str] | None = None) -> int:
    # A console that cannot show a character (cp932, ascii) gets an escape, not a traceback.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    with settings.parsing(parser):
        args, extra = parser.parse_known_args(argv)
    # argparse settles an optional REPO before it reads the options after JOB, so
    # `rerun JOB --relay R REPO` leaves REPO over: it is the positional it belongs to.
    if len(extra) == 1 and not extra[0].startswith("-") and getattr(args, "repo", "") is None:
        args.repo = extra.pop()
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    settings.fill(parser, args)
    if argv is None:
        _exec_without_url_password(args)
    module = importlib.import_module(_HANDLERS[args.command])
    try:
        code: int = module.main(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``reconciler validate | head``): stop quietly,
        # and keep the interpreter's final flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as if killed by SIGPIPE, like any command cut off by head
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EIO, errno.EFBIG) or e.filename is not None:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        try:
            print(f"reconciler {args.command}: cannot write the output: {e.strerror}", file=sys.stderr)
        except OSError:
            pass
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
