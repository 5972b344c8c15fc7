"""The client agent: check in with the relay, run the actions it hands out, report back.

One *step* is one check-in (facts, labels, confirmed inventory and every
finished-but-unacknowledged result) followed by running the reply's actions in
order. Results are not posted separately: they ride on the next check-in and
are re-sent until a check-in reply arrives, so a relay that is down, restarted
or slow loses nothing. That makes the agent's disk the only state that
matters, and every piece of it is written atomically (see ``journal.py`` and
``installers.py``): an agent killed at any moment converges when restarted.
That includes an installer command still running when the agent was killed:
it runs under a supervisor process that outlives the agent and records how
the installer ended (``supervisor.py``). Before its first check-in the
restarted agent waits for such a command, up to its timeout; when the relay
sends the operation again, it is answered with that recorded result instead
of running the installer a second time.

An install action may name its ``dependsOn``; it runs only when this
client's confirmed inventory holds every dependency at its ``minVersion``
(``dependencies.py``), so a dependency that failed earlier in the same reply
stops its dependent instead of leaving it installed on nothing.

Everything the agent sends is valid Unicode, because the relay stores and
republishes it: command-line text that is not (``--label dept=$'\\xff'``
decodes to lone surrogates) is refused at start-up, and text from the
operating system (host name, installer output, error messages) has any
undecodable bytes replaced.

Relay failures are classified at the HTTP boundary: unreachable or 5xx
(:class:`RelayUnavailable`, back off exponentially up to the poll interval),
401/403 (:class:`RelayRefused`, our token is not accepted; logged loudly,
backed off, and no state is deleted, since only an operator knows whether the
relay or the client is wrong), any other refusal (:class:`RelayError`). A
refusal's ``reason`` tells the agent what to do and the operator what to run:
with its enrolment secret (``--enroll-secret-file``) the agent registers, and
re-enrols at once when the relay says its token was revoked (``reconciler
clients rekey`` on the relay host); a client waiting for approval keeps its
token and asks again every poll interval; every other refusal names the
``reconciler clients`` command to run on the relay host.

With ``--software-inventory auto`` (the command's default; an in-process
``Agent`` has none unless given a :class:`~reconciler.agent.software.Collector`)
each check-in also carries the digest of the software the operating system
lists as installed, and the list itself only when the relay does not hold
that digest yet (``software.py``; README, "Software inventory").

``Agent`` is usable in-process (tests, load generators, ``reconciler demo``):
``step()`` does one round, ``run_once()`` and ``run_forever(stop)`` drive it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import random
import re
import shlex
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from reconciler import names, protocol
from reconciler.agent import detection
from reconciler.agent.content import DEFAULT_REHASH_SECONDS
from reconciler.agent.dependencies import parse_depends_on, unmet
from reconciler.agent.errors import ArtifactUnavailable, InstallError
from reconciler.agent.installers import (
    ArtifactRef,
    InstallerSpec,
    Layout,
    Outcome,
    Receipt,
    check_segment,
    install,
    read_receipt,
    uninstall,
    write_receipt,
)
from reconciler.agent.journal import FINISHED, Entry, Journal
from reconciler.agent.processes import (
    DEFAULT_OUTPUT_TAIL,
    OUTPUT_TAIL_CHARS,
    ProcessRecord,
    settle_orphan,
)
from reconciler.agent.reboot import (
    RebootGate,
    default_reboot_command,
    read_boot_id,
    reboot_argv,
    run_reboot_command,
)
from reconciler.agent.software import DEFAULT_INTERVAL_MINUTES, Collected, Collector
from reconciler.agent.supervisor import discard_runs, ran_commands, settle_runs
from reconciler.agent.verify import Verifier
from reconciler.credentials import SecretFileError, read_header_secret
from reconciler.fileio import sha256_file, write_atomic
from reconciler.redaction import redact_output, redact_url
from reconciler.signing import KeyFileError, read_public_key
from reconciler.times import format_time, utc_now
from reconciler.tls import (
    PlainHttpRefused,
    TLSConfigError,
    check_url_scheme,
    client_session,
    client_tls_of,
    tls_problem,
)
from reconciler.versions import compare_versions

log = logging.getLogger("reconciler.agent")

DEFAULT_POLL_SECONDS = 30.0
MIN_POLL_SECONDS = 1.0
BACKOFF_BASE_SECONDS = 1.0
HTTP_TIMEOUT = (10.0, 60.0)  # connect, read
MAX_RESULTS_PER_CHECKIN = 100  # keeps the body far below the relay's 1 MiB limit
MESSAGE_MARGIN = 200  # characters of a message besides the output tail ("exit code N: ", "uninstalling ...")
ONCE_MAX_ROUNDS = 5
CACHE_MAX_AGE_SECONDS = 7 * 24 * 3600
CHUNK = 1 << 20

FACT_KEYS = protocol.FACT_KEYS
OS_VALUES = protocol.OS_VALUES
ARCH_VALUES = protocol.ARCH_VALUES
_ARCH_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "x64": "x86_64", "aarch64": "arm64",
                 "arm64": "arm64", "armv8": "arm64", "armv8l": "arm64", "i386": "x86", "i486": "x86",
                 "i586": "x86", "i686": "x86", "x86": "x86"}


# ---------------------------------------------------------------- errors


class AgentConfigError(ValueError):
    """Bad command-line input (client id, ``--fact``, ``--label``): a usage error, exit 2."""


class RelayError(Exception):
    """The relay did not accept a request; ``status`` is the HTTP status if there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class RelayUnavailable(RelayError):
    """Unreachable, timed out, 5xx or a garbled reply: try again later."""


class RelayUntrusted(RelayError):
    """TLS failed (the relay's certificate is not trusted, or it wants ours) or HTTP met HTTPS: needs an operator."""


class RelayRefused(RelayError):
    """401/403: the relay does not accept our token; needs an operator, but we keep trying."""

    def __init__(self, message: str, status: int | None = None, reason: str | None = None) -> None:
        super().__init__(message, status)
        self.reason = reason  # the refusal's protocol reason, e.g. pendingApproval


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_SURROGATE = re.compile("[\ud800-\udfff]")


def is_text(value: str) -> bool:
    """Whether ``value`` is valid Unicode: no lone surrogates, which undecodable bytes become."""
    return _SURROGATE.search(value) is None


def clean_text(value: str) -> str:
    """``value`` with any undecodable bytes (lone surrogates) replaced by U+FFFD, for sending."""
    if is_text(value):
        return value
    try:  # surrogateescape'd bytes (argv, host names, paths): decode them again, leniently
        return os.fsencode(value).decode("utf-8", errors="replace")
    except UnicodeError:
        return _SURROGATE.sub("\ufffd", value)


def check_text(value: str, flag: str, shown: str | None = None) -> str:
    """Refuse command-line text that is not valid Unicode, naming the flag (exit 2)."""
    if is_text(value):
        return value
    try:
        raw = repr(os.fsencode(shown if shown is not None else value))
    except UnicodeError:
        raw = ascii(shown if shown is not None else value)
    raise AgentConfigError(f"{flag} {raw}: not valid text in this locale's encoding (UTF-8); "
                           f"use UTF-8 characters only")


def _short_error(exc: BaseException) -> str:
    """A one-line reason from a requests exception, without urllib3's nested reprs."""
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if match:
        return match.group(0).strip()
    if isinstance(exc, requests.Timeout):
        return "timed out"
    return _cut(f"{type(exc).__name__}: {text}", 200)


def _refusal(response: requests.Response) -> tuple[str | None, str | None]:
    """The ``reason`` and ``token`` of a 401/403 body (docs/PROTOCOL.md), each None when absent or malformed."""
    try:
        data = response.json()
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    reason, token = data.get("reason"), data.get("token")
    return (reason if reason in protocol.REFUSAL_REASONS else None,
            token if names.is_token(token) else None)


def _speaks_https(response: requests.Response) -> bool:
    """Whether a 400 to a plain-HTTP request is an HTTPS server's refusal rather than the relay's JSON error."""
    return "json" not in response.headers.get("Content-Type", "") or "https" in _error_body(response).lower()


def _error_body(response: requests.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return _cut(response.text.strip(), 200)
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return _cut(data["error"], 200)
    return _cut(json.dumps(data), 200)


# ---------------------------------------------------------------- facts


def normalize_os(system: str) -> str:
    """``platform.system()`` as the protocol spells it."""
    return system.strip().lower()


def normalize_arch(machine: str) -> str:
    """``platform.machine()`` as the protocol spells it (``x86_64``, ``arm64``, ``x86``)."""
    key = machine.strip().lower()
    return _ARCH_ALIASES.get(key, key)


def detect_facts(root: Path) -> protocol.Facts:
    """What this machine is, measured now (free disk changes between check-ins; the boot id at a reboot)."""
    facts: protocol.Facts = {
        "os": normalize_os(platform.system()),
        "arch": normalize_arch(platform.machine()),
        "hostname": clean_text(socket.gethostname()),
        "freeDiskMB": shutil.disk_usage(root).free // 2**20,
    }
    boot_id = read_boot_id()
    if boot_id is not None:
        facts["bootId"] = boot_id
    return facts


def parse_fact_overrides(pairs: Iterable[tuple[str, str]] | Mapping[str, Any] | None) -> protocol.Facts:
    """Validate ``--fact K=V`` overrides; used to simulate other machines on one host."""
    items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs or [])
    out: dict[str, Any] = {}
    for key, value in items:
        if isinstance(key, str) and isinstance(value, str):
            check_text(f"{key}={value}", "--fact")
        if key not in FACT_KEYS:
            raise AgentConfigError(f"unknown fact {key!r}: only {', '.join(FACT_KEYS)} can be overridden")
        if key == "freeDiskMB":
            try:
                number = int(value)
            except (TypeError, ValueError):
                raise AgentConfigError(f"fact freeDiskMB must be an integer, got {value!r}") from None
            value = number
        else:
            value = str(value)
        problem = protocol.fact_problem(key, value)
        if problem is not None:
            raise AgentConfigError(problem)
        out[key] = value
    return cast(protocol.Facts, out)  # each key is one of FACT_KEYS, each value passed fact_problem


# ---------------------------------------------------------------- artifacts




def _download(session: requests.Session, url: str, part: Path, offset: int,
              headers: Mapping[str, str], sha: str, size: int | None = None) -> None:
    """Append the rest of the artifact to ``part`` (or rewrite it if the relay ignores Range).

    More bytes than the action's ``size`` are refused as they arrive: a relay
    cannot fill the client's disk with an endless body.
    """
    request_headers = dict(headers)
    if offset:
        request_headers["Range"] = f"bytes={offset}-"
    try:
        with session.get(url, headers=request_headers, stream=True, timeout=HTTP_TIMEOUT) as response:
            if response.status_code == 416 and offset:
                return  # the part is already complete (or too long); the hash decides
            if response.status_code == 404:
                raise ArtifactUnavailable(f"artifact {sha} not found on the relay")
            if response.status_code not in (200, 206):
                raise ArtifactUnavailable(f"downloading artifact {sha}: HTTP {response.status_code}: "
                                   f"{_error_body(response)}")
            append = response.status_code == 206 and offset > 0
            if append:
                match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
                if not match or int(match.group(1)) != offset:
                    raise ArtifactUnavailable(f"downloading artifact {sha}: relay answered an unexpected range")
            written = offset if append else 0
            with open(part, "ab" if append else "wb") as handle:
                for chunk in response.iter_content(CHUNK):
                    written += len(chunk)
                    if size is not None and written > size:
                        raise InstallError(f"downloading artifact {sha}: the relay sent more than its {size} bytes")
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
    except requests.RequestException as exc:
        raise ArtifactUnavailable(f"downloading artifact {sha}: {_short_error(exc)}") from exc


def fetch_artifact(session: requests.Session, relay_url: str, ref: ArtifactRef, layout: Layout,
                   headers: Mapping[str, str] | None = None) -> Path:
    """A verified local copy of an artifact: from the cache, or downloaded with resume.

    A cached file is hashed again before use (the disk may have changed it).
    A resumed download that fails verification is retried once from the start,
    since the bad bytes may be an old partial file; a fresh one that fails is
    the relay's fault and fails the action (the relay verified what it
    staged, so wrong bytes are a fault to show, not a blip to wait out). A
    download that could not be made (the relay unreachable, an HTTP error, a
    cut connection) raises :class:`ArtifactUnavailable`: nothing was run.
    """
    final = layout.cached_artifact(ref.sha256)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_file():
        if sha256_file(final) == ref.sha256:
            os.utime(final)  # recently used: keep it through cache pruning
            return final
        log.warning("cached artifact %s is corrupt; downloading it again", ref.sha256)
        final.unlink()
    part = final.with_name(final.name + ".part")
    url = f"{relay_url}/v1/artifacts/{ref.sha256}"
    digest = ""
    for _attempt in range(2):
        offset = part.stat().st_size if part.is_file() else 0
        if ref.size is not None and offset > ref.size:
            part.unlink()
            offset = 0
        if ref.size is None or offset < ref.size:
            _download(session, url, part, offset, headers or {}, ref.sha256, ref.size)
        digest = sha256_file(part) if part.is_file() else hashlib.sha256(b"").hexdigest()
        if digest == ref.sha256:
            os.replace(part, final)
            return final
        part.unlink(missing_ok=True)
        if offset == 0:
            break
    raise InstallError(f"sha256 mismatch: expected {ref.sha256} got {digest}")


def prune_cache(layout: Layout, max_age: float = CACHE_MAX_AGE_SECONDS) -> None:
    """Forget downloads unused for a week; a reinstall just fetches again from the relay."""
    if not layout.cache.is_dir():
        return
    horizon = time.time() - max_age
    for path in layout.cache.iterdir():
        try:
            if path.is_file() and path.stat().st_mtime < horizon:
                path.unlink()
        except OSError:
            pass


# ---------------------------------------------------------------- agent


@dataclass(frozen=True)
class CheckinReply:
    """The parts of a check-in reply the agent acts on."""

    actions: tuple[protocol.Action, ...]  # each action's fields are checked when it runs
    poll_seconds: float
    acknowledged: int
    reply: protocol.CheckinReply | None = None  # the whole reply (its manifest and documents, for the verifier)
    # the inventory this check-in reported (what the relay planned on): the verifier's installed versions
    installed: tuple[tuple[str, str], ...] = ()
    facts: protocol.Facts | None = None  # ... and its facts and labels (the package's requirements are checked)
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StepResult:
    """What one step did: whether the relay answered, and the actions and results it involved."""

    reached: bool
    status_code: int | None = None
    error: str | None = None
    actions: int = 0
    ran: int = 0
    results: tuple[dict[str, Any], ...] = ()
    reported: int = 0
    poll_seconds: float = DEFAULT_POLL_SECONDS
    rebooting: tuple[str, ...] = ()  # packages whose installers asked for the reboot command this step ran


def _redact_patterns(action: Any) -> tuple[re.Pattern[str], ...]:
    """The action's ``installer.redact`` patterns, compiled; none if its installer is malformed (it then fails)."""
    installer = action.get("installer") if isinstance(action, dict) else None
    if not isinstance(installer, dict):
        return ()
    try:
        return InstallerSpec.from_dict(installer).redact_patterns
    except InstallError:
        return ()


def _wire_result(journalled: Mapping[str, Any]) -> protocol.Result:
    """A journalled result as a check-in carries it (results journalled by older agents were not cleaned)."""
    result: protocol.Result = {
        "operationId": journalled["operationId"], "status": journalled["status"],
        "exitCode": journalled.get("exitCode"), "message": clean_text(str(journalled.get("message") or "")),
        "finishedAt": journalled.get("finishedAt")}
    if journalled.get("rebootRequired") is True and journalled["status"] == "succeeded":
        result["rebootRequired"] = True
        boot_id = journalled.get("bootId")
        if isinstance(boot_id, str) and protocol.is_boot_id(boot_id):
            result["bootId"] = boot_id
    return result


class _ClientLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefix every line with the client id: one process may run many agents (demo, load tests)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"[{self.extra['client']}] {msg}", kwargs  # type: ignore[index]


class Agent:
    """One client: its root directory, its relay, and the loop that keeps them in step."""

    def __init__(self, client_id: str, relay_url: str, root: Path,
                 labels: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                 fact_overrides: Mapping[str, Any] | Iterable[tuple[str, str]] | None = None,
                 session: requests.Session | None = None, *, poll_interval: float | None = None,
                 output_tail: int = DEFAULT_OUTPUT_TAIL, enroll_secret: str | None = None,
                 now: Callable[[], datetime] = utc_now, insecure_http: bool = False,
                 trust_keys: Sequence[Ed25519PublicKey] = (), dpkg_root: Path | None = None,
                 rpm_root: Path | None = None, software: Collector | None = None,
                 software_interval: float = DEFAULT_INTERVAL_MINUTES * 60.0,
                 monotonic: Callable[[], float] = time.monotonic,
                 rehash_seconds: float = DEFAULT_REHASH_SECONDS, reboot_command: Sequence[str] = (),
                 detect_seconds: float = detection.DEFAULT_DETECT_SECONDS) -> None:
        if isinstance(client_id, str):
            check_text(client_id, "--id")
        if not names.is_client_id(client_id):
            raise AgentConfigError(f"invalid client id {client_id!r}: use lowercase letters, digits, '.' and '-'")
        check_text(relay_url, "--relay", redact_url(relay_url))
        if not relay_url.startswith(("http://", "https://")):
            raise AgentConfigError(f"relay URL must start with http:// or https://, got {redact_url(relay_url)!r}")
        try:
            check_url_scheme(relay_url, f"--relay {redact_url(relay_url)}", insecure_http)
        except PlainHttpRefused as e:
            raise AgentConfigError(str(e)) from None
        self.plain_http = relay_url.lower().startswith("http://")
        self.client_id = client_id
        self.relay_url = relay_url.rstrip("/")
        pairs = labels.items() if isinstance(labels, Mapping) else (labels or [])
        self.labels: dict[str, str] = {}
        for key, value in pairs:
            self.labels[check_text(str(key), "--label", f"{key}={value}")] = check_text(
                str(value), "--label", f"{key}={value}")
            problem = protocol.label_problem(str(key), str(value))
            if problem is not None:
                raise AgentConfigError(f"--label: {problem}")
        if len(self.labels) > protocol.MAX_LABELS:
            raise AgentConfigError(f"--label: at most {protocol.MAX_LABELS} labels, got {len(self.labels)}")
        self.fact_overrides = parse_fact_overrides(fact_overrides)
        platform_facts = {"os": normalize_os(platform.system()), "arch": normalize_arch(platform.machine()),
                          **self.fact_overrides}
        client_env = {"RECONCILER_CLIENT_ID": client_id}
        for fact, variable in (("os", "RECONCILER_OS"), ("arch", "RECONCILER_ARCH")):
            if fact in platform_facts:
                client_env[variable] = str(platform_facts[fact])
        if isinstance(output_tail, bool) or not 0 <= output_tail <= OUTPUT_TAIL_CHARS:
            raise AgentConfigError(f"--output-tail: expected 0 to {OUTPUT_TAIL_CHARS} characters, got {output_tail}")
        if isinstance(rehash_seconds, bool) or not rehash_seconds > 0:
            raise AgentConfigError(f"--rehash-interval: expected a positive number of seconds, got {rehash_seconds}")
        if (isinstance(detect_seconds, bool) or not isinstance(detect_seconds, (int, float))
                or not 0 <= detect_seconds <= detection.MAX_DETECT_SECONDS):
            raise AgentConfigError(f"--detect-interval: expected 0 (every check-in) to "
                                   f"{detection.MAX_DETECT_SECONDS:g} seconds, got {detect_seconds}")
        self.layout = Layout(Path(root).absolute(), output_tail, tuple(sorted(client_env.items())),
                             float(rehash_seconds),
                             dpkg_root=Path(dpkg_root).absolute() if dpkg_root else None,
                             rpm_root=Path(rpm_root).absolute() if rpm_root else None)
        self.layout.create()
        self.session = session or requests.Session()
        self.poll_interval = poll_interval
        self.enroll_secret = enroll_secret  # the relay's enrolment secret: presented only to get a token
        self.relay_poll_seconds: float | None = None
        self.failures = 0
        self._now = now
        self.journal = Journal(self.layout.journal, now)
        # With HQ's key(s): every action is checked against HQ's signed manifest before it runs (verify.py).
        self.verifier = Verifier(trust_keys, self.layout.root, client_id) if trust_keys else None
        self.log = _ClientLog(log, {"client": client_id})
        # The OS's software inventory (software.py): None is off (--software-inventory off; in-process agents).
        self.software = software
        self.software_interval = software_interval
        self._monotonic = monotonic
        self._software: Collected | None = None
        self._software_at = float("-inf")
        self._software_error: str | None = None
        # Each package's last detection, reused for --detect-interval seconds (detection.py); not kept on disk.
        self.detections = detection.DetectionCache(float(detect_seconds), monotonic)
        # Run when an action with reboot: ifRequired succeeds and asks for a reboot (empty: never; reboot.py).
        self.reboot_command = tuple(reboot_command)
        self.reboot_gate = RebootGate(self.layout.root)
        prune_cache(self.layout)
        self.settle_interrupted()

    # -- state

    @property
    def token(self) -> str | None:
        """The per-client token from registration, if we have registered."""
        try:
            return self.layout.token.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def _store_token(self, token: str) -> None:
        write_atomic(self.layout.token, token.encode("utf-8"), mode=0o600)

    @property
    def last_relay(self) -> str | None:
        """The name of the relay that last answered, if any (a bad file reads as none)."""
        try:
            name = self.layout.relay_name.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return name if names.is_name(name) else None

    @property
    def poll_seconds(self) -> float:
        """Seconds between check-ins: ``--poll-interval``, else the relay's, else 30."""
        return float(self.poll_interval or self.relay_poll_seconds or DEFAULT_POLL_SECONDS)

    def facts(self) -> protocol.Facts:
        """Measured facts with the ``--fact`` overrides applied."""
        facts = detect_facts(self.layout.root)
        facts.update(self.fact_overrides)
        return facts

    def boot_id(self) -> str | None:
        """This boot's id: the ``--fact bootId`` override, else the one the machine says (None: unknown)."""
        return self.fact_overrides.get("bootId") or read_boot_id()

    def inventory(self) -> list[protocol.InventoryEntry]:
        """Installed packages: receipts confirmed (files present and unchanged, ``detect``), and what the
        remembered detection rules find, receipt or not (detection.py); each package asked at most every
        ``--detect-interval`` seconds, and at the first check-in after an action ran for it."""
        return detection.inventory(self.layout, cache=self.detections)

    # -- the OS's software inventory

    @property
    def software_ack_path(self) -> Path:
        """The digest of the software list the relay last said it holds, and that relay's URL."""
        return self.layout.root / "software-ack.json"

    def software_list(self, force: bool = False) -> Collected | None:
        """The OS's software list: collected at most every ``software_interval`` seconds (or when ``force``).

        None when off, or when no collection has worked yet; a collection that
        fails keeps the last good list (a timeout is not "nothing installed").
        """
        if self.software is None:
            return None
        now = self._monotonic()
        if force or self._software is None or now - self._software_at >= self.software_interval:
            self._software_at = now
            collected = self.software.collect()
            if collected.error is not None:
                if collected.error != self._software_error:
                    self.log.warning("software inventory not collected: %s", collected.error)
                self._software_error = collected.error
            else:
                if collected.omitted and (self._software is None or self._software.digest != collected.digest):
                    self.log.warning("software inventory: %d entries cut (at most %d entries, %d bytes are sent); "
                                     "the relay shows the list as cut", collected.omitted, protocol.MAX_SOFTWARE,
                                     protocol.MAX_SOFTWARE_BYTES)
                self._software_error = None
                self._software = collected
        return self._software

    def software_acknowledged(self) -> tuple[bool, str | None]:
        """Whether this relay reads software inventories (it said so in a reply), and the digest it holds."""
        try:
            data = json.loads(self.software_ack_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False, None
        if not isinstance(data, dict) or data.get("relay") != self.relay_url:
            return False, None  # another relay: it says what it holds at the first check-in
        digest = data.get("digest")
        return True, digest if protocol.is_digest(digest) else None

    def software_pending(self) -> bool:
        """Whether the relay reads software inventories and does not hold this client's current list."""
        known, held = self.software_acknowledged()
        return known and self._software is not None and held != self._software.digest

    def _acknowledge_software(self, held: str | None) -> None:
        if self.software_acknowledged() != (True, held):
            write_atomic(self.software_ack_path, json.dumps({"relay": self.relay_url, "digest": held}).encode())

    def _headers(self, enroll: bool = False) -> dict[str, str]:
        token = self.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if self.enroll_secret is not None and (enroll or not token):
            headers[protocol.ENROLLMENT_HEADER] = self.enroll_secret
        return headers

    def _refused(self, response: requests.Response) -> RelayRefused:
        """The error for a 401/403 of a check-in, naming what the operator runs on the relay host."""
        status = response.status_code
        reason, _ = _refusal(response)
        said = f"{status}: {_error_body(response)}"
        on_relay = "on the relay host run `reconciler clients {} " + self.client_id + " --workdir <the relay's workdir>`"
        if reason == protocol.REASON_PENDING_APPROVAL:
            text = (f"registered with relay {redact_url(self.relay_url)}, waiting for approval: "
                    f"{on_relay.format('approve')} ({said})")
        elif reason == protocol.REASON_ENROLLMENT_REFUSED:
            text = (f"relay refused our enrolment secret ({said}); give this agent --enroll-secret-file with the "
                    "relay's --enroll-secret-file")
        elif reason == protocol.REASON_ENROLLMENT_REQUIRED and self.enroll_secret is None:
            text = (f"relay refused the check-in ({said}); this agent has no enrolment secret: give it "
                    "--enroll-secret-file with the relay's --enroll-secret-file")
        elif reason == protocol.REASON_ENROLLMENT_REQUIRED:
            text = (f"relay refused the check-in ({said}); if the relay lost this client, "
                    f"{on_relay.format('list')}")
        else:
            text = (f"relay refused our token ({said}); if this client should be served (its token was lost, "
                    f"or it was re-imaged), {on_relay.format('rekey')}: this agent then re-enrols with its "
                    "--enroll-secret-file at its next check-in")
        return RelayRefused(text, status, reason)

    # -- relay

    def checkin(self) -> CheckinReply:
        """POST one check-in; on a reply, store a new token and acknowledge the results sent."""
        results = [_wire_result(r) for r in self.journal.pending_results(limit=MAX_RESULTS_PER_CHECKIN)]
        inventory = self.inventory()
        body: protocol.CheckinRequest = {"facts": self.facts(), "labels": dict(self.labels),
                                         "inventory": inventory, "results": results}
        last_relay = self.last_relay
        if last_relay is not None:
            body["lastRelay"] = last_relay
        if self.verifier is not None:
            body["trustSerial"] = self.verifier.serial
        software = self.software_list()
        reads_software, held = self.software_acknowledged()
        if software is not None and reads_software:
            body["softwareDigest"] = software.digest
            if held != software.digest:  # only a list the relay does not hold yet is sent
                body["software"] = list(software.entries)
                if software.omitted:
                    body["softwareOmitted"] = software.omitted
        url = f"{self.relay_url}/v1/clients/{self.client_id}/checkin"
        headers = self._headers()
        response = self._post(url, body, headers)
        status = response.status_code
        if (status == 401 and _refusal(response)[0] == protocol.REASON_ENROLLMENT_REQUIRED
                and self.enroll_secret is not None and protocol.ENROLLMENT_HEADER not in headers):
            # Our token was revoked (`reconciler clients rekey`) or the relay no longer knows us: enrol again.
            self.log.info("relay %s asks this client to enrol again; presenting the enrolment secret",
                          redact_url(self.relay_url))
            response = self._post(url, body, self._headers(enroll=True))
            status = response.status_code
        if self.plain_http and status == 400 and _speaks_https(response):
            raise RelayUntrusted(f"relay {redact_url(self.relay_url)} did not accept plain HTTP (400: "
                                 f"{_error_body(response)}); it serves HTTPS: use an https:// URL", status)
        if status in (401, 403):
            reason, token = _refusal(response)
            if reason == protocol.REASON_PENDING_APPROVAL and token is not None and token != self.token:
                self._store_token(token)  # registered: the approval admits the holder of this token
                self.log.info("registered with relay %s; waiting for approval", redact_url(self.relay_url))
            raise self._refused(response)
        if status >= 500:
            raise RelayUnavailable(f"relay error {status}: {_error_body(response)}", status)
        if status != 200:
            raise RelayError(f"relay refused the check-in ({status}): {_error_body(response)}", status)
        try:
            reply = protocol.check_reply(protocol.decode_json(response.content, "reply"))
        except protocol.ProtocolError as exc:
            raise RelayUnavailable(f"relay sent a malformed reply: {_cut(str(exc), 200)}", status) from exc
        token = reply.get("token")
        if token is not None and token != self.token:
            self._store_token(token)
            self.log.info("registered with relay %s", redact_url(self.relay_url))
        relay = reply.get("relay")
        if relay is not None and relay != last_relay:
            write_atomic(self.layout.relay_name, f"{relay}\n".encode())
            if last_relay is not None:
                self.log.info("now served by relay %s (was %s)", relay, last_relay)
        self.journal.acknowledge(r["operationId"] for r in results)
        if "softwareDigest" in reply and self.software is not None:
            self._acknowledge_software(reply["softwareDigest"])
        return CheckinReply(tuple(reply["actions"]), max(float(reply["pollSeconds"]), MIN_POLL_SECONDS),
                            len(results), reply, tuple((e["name"], e["version"]) for e in inventory),
                            body["facts"], tuple(sorted(self.labels.items())))

    def _post(self, url: str, body: protocol.CheckinRequest, headers: Mapping[str, str]) -> requests.Response:
        try:
            # No redirects: requests would resend the enrolment secret to wherever a redirect points.
            return self.session.post(url, json=body, headers=dict(headers), timeout=HTTP_TIMEOUT,
                                     allow_redirects=False)
        except requests.RequestException as exc:
            problem = tls_problem(exc)
            if problem is not None:
                raise RelayUntrusted(f"TLS with relay {redact_url(self.relay_url)} failed: {problem}") from exc
            raise RelayUnavailable(f"relay {redact_url(self.relay_url)} unreachable: {_short_error(exc)}") from exc

    def fetch(self, ref: ArtifactRef) -> Path:
        """A verified copy of the artifact in ``cache/``."""
        token = self.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}  # never the enrolment secret
        return fetch_artifact(self.session, self.relay_url, ref, self.layout, headers)

    # -- actions

    def settle_interrupted(self) -> None:
        """At start-up: wait out (or stop) installer commands a killed agent left running.

        Done before the first check-in, because that already runs ``detect``
        commands, and any action after it might touch the same package. The
        operations stay ``started``: the relay sends them again, and they
        resume then, taking each command's recorded result (``supervisor.py``)
        instead of running it again. Entries from agents that predate the
        supervisor only know the command's pid: its orphan is waited for
        (or killed), and that operation runs again in full.
        """
        for entry in self.journal.unfinished():
            try:
                self._settle(entry)
                settle_runs(self.layout.operation_runs(entry.operation_id))
            except InstallError as exc:  # the operation fails when it is sent again
                self.log.error("operation %s: %s", entry.operation_id, exc.message)
            except OSError as exc:  # unreadable state: the operation sorts it out when sent again
                self.log.error("operation %s: settling its commands failed: %s", entry.operation_id, exc)
        for entry in self.journal.entries():
            if entry.state == FINISHED:  # killed between journalling the result and tidying up
                discard_runs(self.layout.operation_runs(entry.operation_id))

    def _settle(self, entry: Entry | None) -> None:
        """Make sure the command a pre-supervisor agent recorded no longer runs, then forget it.

        Its exit status died with that agent (only a parent can collect it),
        so the operation is run again afterwards; installs converge.
        """
        if entry is None or entry.process is None:
            return
        try:
            record = ProcessRecord.from_dict(entry.process)
        except ValueError as exc:
            self.log.warning("operation %s: unreadable process record (%s); ignored", entry.operation_id, exc)
        else:
            self.log.info("operation %s interrupted: %s", entry.operation_id,
                          settle_orphan(record))
        self.journal.record_process(entry.operation_id, None)

    def _execute(self, action: Mapping[str, Any]) -> Outcome:
        """Carry out one action; raises :class:`InstallError` with the message for the relay."""
        kind = action.get("action")
        package = action.get("package")
        if not isinstance(package, dict):
            raise InstallError("action has no package")
        name = check_segment(package.get("name"), "package name")
        raw_version = package.get("version")
        operation_id = str(action["operationId"])
        if kind == "uninstall":
            only = None if raw_version is None else check_segment(raw_version, "package version")
            outcome = uninstall(self.layout, name, only, operation_id)
            # software installed by other means stays, and is no longer looked for (no uninstall loop)
            detection.forget(self.layout, name)
            return outcome
        if kind not in ("install", "upgrade", "downgrade"):
            raise InstallError(f"unknown action {kind!r}")
        version = check_segment(raw_version, "package version")
        installer = InstallerSpec.from_dict(action.get("installer"))
        ref = ArtifactRef.from_dict(action.get("artifact"))
        dependencies = parse_depends_on(action.get("dependsOn"))
        detection.remember(self.layout, name, version, installer)
        # a resumed operation already ran commands: it finishes as they ended, whatever changed since
        if not ran_commands(self.layout.operation_runs(operation_id)):
            present = self._preflight(str(kind), name, version, installer, operation_id)
            if present is not None:
                return present
            why = unmet(self.layout, dependencies)
            if why is not None:
                raise InstallError(f"not run: {why}")
        previous = action.get("previousVersion")
        if previous:
            self.log.info("%s %s: replacing %s with %s", kind, name, previous, version)
        outcome = install(self.layout, name, version, installer, lambda: self.fetch(ref), ref, operation_id,
                          self._now())
        if installer.detection is not None:
            found = detection.installed_version(self.layout, name, version, installer)
            if found is None or found.version != version:
                what = "does not find it" if found is None else f"finds version {found.version}"
                raise InstallError(f"installed {name} {version}, but the package's detection rule {what}")
        return outcome

    def _preflight(self, kind: str, name: str, version: str, installer: InstallerSpec,
                   operation_id: str) -> Outcome | None:
        """Before an install: ask the package's detection rule; an outcome when nothing needs to run.

        The version wanted already there (installed by hand, or by another
        tool) is adopted: a receipt marked ``origin: detected``, nothing run.
        A newer one is left alone unless the action is a downgrade; the next
        check-in's inventory reports it, so the plan shows the row Skipped
        "newer version ... present". An older one is upgraded: the action
        runs. A receipt of the wanted version means a reinstall (a repair, or
        drift healing): it runs whatever the rule says.
        """
        found = detection.installed_version(self.layout, name, version, installer)
        if found is None:
            return None
        receipt = read_receipt(self.layout, name)
        if receipt is not None and receipt.version == version:
            return None
        order = compare_versions(found.version, version)
        if order == 0:
            write_receipt(self.layout, Receipt(name, version, installer, operation_id, format_time(self._now()),
                                               {}, origin="detected"))
            self.log.info("%s %s already present (%s); adopted, nothing run", name, version, found.how)
            return Outcome(0, f"{name} {version} already present ({found.how}); adopted, nothing run")
        if order > 0 and kind != "downgrade":
            self.log.info("%s: newer version %s present (%s); %s not installed", name, found.version, found.how,
                          version)
            return Outcome(0, f"not installed: newer version {found.version} present ({found.how})")
        return None

    def run_action(self, action: Any) -> dict[str, Any] | None:
        """Run one action exactly once per operationId, journalled; returns its result.

        An operation the journal knows as finished is not run again: its stored
        result is queued to be re-sent. One left ``started`` is resumed: a
        command that already ran is answered from its recorded result, and
        one that never ran, or whose supervisor died with it (a reboot),
        runs now. ``None`` for an action without a valid operationId, which
        cannot be reported and is skipped.
        """
        operation_id = action.get("operationId") if isinstance(action, dict) else None
        if not isinstance(operation_id, str) or not names.is_operation_id(operation_id):
            self.log.warning("skipping an action without a valid operationId: %s", _cut(repr(action), 200))
            return None
        entry = self.journal.get(operation_id)
        if entry is not None and entry.state == FINISHED and entry.result is not None:
            self.log.info("operation %s already finished (%s); re-sending its result",
                          operation_id, entry.result.get("status"))
            self.journal.requeue(operation_id)
            return dict(entry.result)
        # whatever this action does to its package, the next check-in asks about that package again
        self._forget_detected(action)
        try:
            self._settle(entry)
        except InstallError as exc:
            return self._finish(operation_id, "failed", None, exc.message, _redact_patterns(action))
        self.journal.start(operation_id, action)
        try:
            outcome = self._execute(action)
            status, message = "succeeded", outcome.message
            exit_code: int | None = outcome.exit_code
            reboot = outcome.reboot_required
        except ArtifactUnavailable as exc:
            reboot = False
            # Nothing of this operation ran: the relay sends the same attempt again later. Once a
            # command of it ran (a resumed upgrade removed the old version), it is a failed attempt.
            ran = ran_commands(self.layout.operation_runs(operation_id))
            status, exit_code, message = "failed" if ran else "notAttempted", None, exc.message
        except InstallError as exc:
            status, exit_code, message, reboot = "failed", exc.exit_code, exc.message, False
        except Exception as exc:  # always record an outcome: a bug must not wedge the operation
            self.log.exception("operation %s crashed", operation_id)
            status, exit_code, message = "failed", None, f"agent error: {type(exc).__name__}: {exc}"
            reboot = False
        self._forget_detected(action)
        return self._finish(operation_id, status, exit_code, message, _redact_patterns(action), reboot)

    def _forget_detected(self, action: Mapping[str, Any]) -> None:
        """Drop the cached detection of an action's package (the whole cache when it names none properly)."""
        package = action.get("package")
        name = package.get("name") if isinstance(package, dict) else None
        self.detections.forget(name if isinstance(name, str) else None)

    def refuse_action(self, action: Any, why: str) -> dict[str, Any] | None:
        """Answer an action the verifier refused: nothing runs, the result is ``refused`` with the reason.

        An operation already finished is answered from the journal, as by
        :meth:`run_action` (the relay asked again; what happened stands).
        """
        operation_id = action.get("operationId") if isinstance(action, dict) else None
        if not isinstance(operation_id, str) or not names.is_operation_id(operation_id):
            self.log.error("refused an action without a valid operationId: security: %s", _cut(why, 300))
            return None
        entry = self.journal.get(operation_id)
        if entry is not None and entry.state == FINISHED and entry.result is not None:
            self.journal.requeue(operation_id)
            return dict(entry.result)
        self.log.error("operation %s refused: %s", operation_id, _cut(why, 300))
        return self._finish(operation_id, "refused", None, f"security: {why}")

    def _finish(self, operation_id: str, status: str, exit_code: int | None, message: str,
                redact: tuple[re.Pattern[str], ...] = (), reboot_required: bool = False) -> dict[str, Any]:
        """Journal an operation's result (to be reported at the next check-in) and log it.

        The message is masked once more as a whole (:func:`redact_output`: an
        error quoting a command line or a URL is covered too) before the
        journal, the log or the relay sees it.
        """
        message = redact_output(clean_text(message), redact)
        result = {"operationId": operation_id, "status": status, "exitCode": exit_code,
                  "message": _cut(message, self.layout.output_tail + MESSAGE_MARGIN),
                  "finishedAt": format_time(self._now())}
        if reboot_required:
            result["rebootRequired"] = True
            boot_id = self.boot_id()  # the relay waits for another one: the result may arrive after the reboot
            if boot_id is not None:
                result["bootId"] = boot_id
        self.journal.finish(operation_id, result)
        discard_runs(self.layout.operation_runs(operation_id))
        self.log.info("operation %s %s: %s", operation_id, status, _cut(message.splitlines()[0]
                                                                          if message else "", 200))
        return result

    # -- loop

    def step(self) -> StepResult:
        """One check-in, then the reply's actions in order. Never raises for relay trouble."""
        try:
            reply = self.checkin()
        except RelayError as exc:
            self.failures += 1
            waiting = isinstance(exc, RelayRefused) and exc.reason == protocol.REASON_PENDING_APPROVAL
            level = (logging.ERROR if isinstance(exc, (RelayRefused, RelayUntrusted)) and not waiting
                     else logging.WARNING)
            self.log.log(level, "check-in failed: %s", exc.message)
            return StepResult(False, exc.status, exc.message, poll_seconds=self.poll_seconds)
        self.failures = 0
        self.relay_poll_seconds = reply.poll_seconds
        results: list[dict[str, Any]] = []
        ran = 0
        refused: dict[int, str] = {}
        if self.verifier is not None and reply.reply is not None:
            refused = self.verifier.refusals(reply.reply, self.relay_url, dict(reply.installed), facts=reply.facts,
                                             labels=dict(reply.labels), now=self._now())
        wants_reboot: list[str] = []  # packages of this reply's actions that may reboot and asked to
        for index, action in enumerate(reply.actions):
            operation_id = action.get("operationId")  # missing or mistyped in a malformed action: run_action skips it
            entry = self.journal.get(operation_id) if isinstance(operation_id, str) else None
            answered_from_journal = entry is not None and entry.state == FINISHED
            why = refused.get(index)
            result = self.run_action(action) if why is None else self.refuse_action(action, why)
            if result is not None:
                results.append(result)
                ran += 0 if answered_from_journal else 1
                if (why is None and not answered_from_journal and action.get("reboot") == "ifRequired"
                        and result.get("status") == "succeeded" and result.get("rebootRequired") is True):
                    package = action.get("package")
                    wants_reboot.append(str(package.get("name")) if isinstance(package, dict) else "?")
        if ran:
            prune_cache(self.layout)
            self.software_list(force=True)  # an install may have changed what the OS lists
        # Every action of the reply has finished and its result is journalled: only now may the client reboot.
        rebooting = self._reboot(wants_reboot) if wants_reboot else ()
        return StepResult(True, 200, None, len(reply.actions), ran, tuple(results), reply.acknowledged,
                          self.poll_seconds, rebooting)

    def _reboot(self, packages: Sequence[str]) -> tuple[str, ...]:
        """Run the reboot command for ``packages`` unless it is off or ran in this boot; the packages if it ran."""
        names_ = tuple(sorted(set(packages)))
        if not self.reboot_command:
            self.log.warning("%s asked for a reboot (reboot: ifRequired); the reboot command is off: reboot this "
                             "client to finish", ", ".join(names_))
            return ()
        boot_id = self.boot_id()
        if self.reboot_gate.ran_in(boot_id):
            self.log.info("%s asked for a reboot; the reboot command ran in this boot already", ", ".join(names_))
            return ()
        argv = reboot_argv(self.reboot_command, names_)
        self.reboot_gate.record(boot_id, names_, self._now())
        self.log.warning("rebooting: %s asked for it; running %s", ", ".join(names_), " ".join(argv))
        problem = run_reboot_command(argv)
        if problem is not None:
            self.log.error("the reboot command failed: %s", problem)
            return ()
        return names_

    def next_delay(self) -> float:
        """Seconds until the next check-in: the poll interval, or a jittered backoff after failures."""
        if self.failures == 0:
            return self.poll_seconds
        backoff = min(self.poll_seconds, BACKOFF_BASE_SECONDS * 2.0 ** min(self.failures - 1, 30))
        return backoff * random.uniform(0.8, 1.0)  # a fleet must not retry in lockstep

    def run_once(self) -> int:
        """Check in, run the actions, report; 1 if the relay could not be reached at all.

        Keeps going while check-ins hand out new work (up to a few rounds), so
        the results of the last actions are reported before exiting.
        """
        result = self.step()
        if not result.reached:
            return 1
        for _ in range(ONCE_MAX_ROUNDS):
            if not result.actions and not self.journal.pending_results() and not self.software_pending():
                break
            result = self.step()
            if not result.reached:
                self.log.warning("results will be reported at the next check-in")
                break
        return 0

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Check in every poll interval until ``stop`` is set; report new results at once."""
        stop = stop or threading.Event()
        while not stop.is_set():
            delay: float
            try:
                result = self.step()
                delay = 0.0 if result.ran else self.next_delay()
            except Exception:  # a full disk or a bug: log, back off, try again
                self.log.exception("step failed")
                self.failures += 1
                delay = self.next_delay()
            stop.wait(min(delay, protocol.MAX_POLL_SECONDS))


def reboot_command_of(args: argparse.Namespace) -> list[str]:
    """``--reboot-command`` split like a shell would (no shell runs it), the OS's default without it, nothing
    with ``--no-reboot`` or an empty command."""
    if getattr(args, "no_reboot", False):
        return []
    text = getattr(args, "reboot_command", None)
    if text is None:
        return default_reboot_command()
    check_text(text, "--reboot-command")
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise AgentConfigError(f"--reboot-command: {exc}") from None


def main(args: argparse.Namespace) -> int:
    """``reconciler agent``: run one client until killed, or one round with ``--once``."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        secret = read_header_secret(args.enroll_secret_file) if getattr(args, "enroll_secret_file", None) else None
        tls = client_tls_of(getattr(args, "ca_file", None), getattr(args, "client_cert", None),
                            getattr(args, "client_key", None))
        trust_files = list(getattr(args, "trust_key", None) or [])
        unsigned = bool(getattr(args, "insecure_unsigned_actions", False))
        if not trust_files and not unsigned:
            raise AgentConfigError("give --trust-key with HQ's public key (reconciler keygen; run only what HQ "
                                   "signed), or --insecure-unsigned-actions to run whatever the relay sends")
        if trust_files and unsigned:
            raise AgentConfigError("--trust-key and --insecure-unsigned-actions contradict each other")
        trust_keys = [read_public_key(path) for path in trust_files]
        agent = Agent(args.id, args.relay, Path(args.root), labels=list(args.label),
                      fact_overrides=list(args.fact), session=client_session(tls), poll_interval=args.poll_interval,
                      output_tail=getattr(args, "output_tail", DEFAULT_OUTPUT_TAIL), enroll_secret=secret,
                      rehash_seconds=getattr(args, "rehash_interval", DEFAULT_REHASH_SECONDS),
                      insecure_http=bool(getattr(args, "insecure_http", False)), trust_keys=trust_keys,
                      dpkg_root=getattr(args, "dpkg_root", None), rpm_root=getattr(args, "rpm_root", None),
                      software=None if getattr(args, "software_inventory", "auto") == "off" else Collector(
                          dpkg_admindir=None if getattr(args, "dpkg_root", None) is None
                          else Path(args.dpkg_root) / "var/lib/dpkg",
                          rpm_root=None if getattr(args, "rpm_root", None) is None else Path(args.rpm_root)),
                      software_interval=float(getattr(args, "software_interval", DEFAULT_INTERVAL_MINUTES)) * 60.0,
                      reboot_command=reboot_command_of(args),
                      detect_seconds=getattr(args, "detect_interval", detection.DEFAULT_DETECT_SECONDS))
    except (AgentConfigError, SecretFileError, TLSConfigError, KeyFileError) as exc:
        print(f"reconciler agent: {exc}", file=sys.stderr)
        return 2
    if agent.verifier is None:
        agent.log.warning("--insecure-unsigned-actions: this client runs whatever its relay sends, unverified")
    if agent.plain_http:
        agent.log.warning("talking plain HTTP to relay %s (--insecure-http): anyone on the network can read and "
                          "change check-ins, actions and artifacts", redact_url(agent.relay_url))
    if args.once:
        return agent.run_once()
    agent.run_forever()
    return 0
