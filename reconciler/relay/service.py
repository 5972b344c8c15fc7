"""``reconciler relay``, the process: settings, workdir, HTTP server, wake-ups, signals.

The process holds an exclusive lock on its workdir (two relays must never
share a database), serves the client API (:class:`~reconciler.relay.server.RelayApp`)
on :class:`~reconciler.serving.Server`, writes the URL it bound to
``<workdir>/listen.url`` (useful with port 0), and runs the
:class:`~reconciler.relay.loop.RelayLoop` on the main thread, its full passes
in a child process (:mod:`reconciler.relay.pass_process`).

Wake-ups: the :class:`~reconciler.gitstore.ChangeWatcher` (a local origin's
refs change: immediately; ``POST /v1/hooks/git``; or every
``--poll-interval``) schedules a fetch; check-ins that changed a client, a
new generation and an operator's ``reconciler clients`` change mark the
state dirty. A full pass runs when the state is dirty (at most every
``--publish-interval``), when a timer the last pass set is due (a schedule
starts or ends, a client with waiting rows goes offline, one is retired:
:meth:`RelayLoop.full_pass` sets ``timer_at``), every pass interval while
rows wait for a result or a retry, and once per ``--inventory-interval`` to
refresh per-client detail; an idle relay plans nothing in between. All
state is in SQLite and git, so a relay killed at any moment converges when
restarted. SIGTERM and SIGINT stop it cleanly.

With ``--hq-url`` a :class:`~reconciler.relay.heartbeat.HeartbeatSender`
thread tells HQ the relay is alive every ``--heartbeat-interval``, starting
after the first full pass (so its first heartbeat already counts the
clients).

Who may register is decided at start-up: ``--enroll-secret-file`` (agents
present the same secret to register), ``--open-enrollment`` (anyone may:
trust on first use, logged as a warning), either with ``--require-approval``.
A relay given neither refuses to start (exit 2): an unauthenticated relay
must be a decision, never a default. ``--child-secret-file`` lets child
relays download artifacts; ``--parent-secret-file`` is what this relay
presents to its ``--parent-url``.

TLS (:mod:`reconciler.tls`): the client API is HTTPS with ``--tls-cert`` and
``--tls-key`` (client certificates required with ``--tls-client-ca``), plain
HTTP only with ``--insecure-http``. One ``--ca-file`` (and one
``--client-cert``/``--client-key``) serves every connection the relay makes
inside the fleet, to its parent relay and to HQ; artifact URLs outside the
fleet are verified against the system's trust store.

``--checkin-interval`` is the check-in interval told to agents (default
``RECONCILER_POLL_SECONDS``, kept from before the flag, else 30 s). The git
hook needs ``--webhook-secret-file`` (or ``RECONCILER_WEBHOOK_SECRET_FILE``,
the environment fallback every flag has) unless ``--insecure-unsigned-webhook`` opens it; without either it
is refused (401) and the poll interval alone picks up changes.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric

from reconciler import names, protocol
from reconciler.credentials import SecretFileError, read_header_secret
from reconciler.gitstore import (
    ChangeWatcher,
    GitStore,
    history_of,
    origin_password,
    url_credentials_warning,
)
from reconciler.logs import configure_logging
from reconciler.metrics import RelayMetrics, gauge, row_gauge
from reconciler.redaction import redact_url
from reconciler.relay import native_heap
from reconciler.relay.artifacts import ArtifactCache
from reconciler.relay.heartbeat import HeartbeatSender
from reconciler.relay.loop import FOLLOW, HOUSEKEEPING, PUBLISHING, RelayLoop
from reconciler.relay.pass_process import PassProcess, PassSettings
from reconciler.relay.server import RelayApp, Trust
from reconciler.relay.state import DEFAULT_POLL_SECONDS, RelayState
from reconciler.relay.store import SEEN_FLUSH_SECONDS, Store, StoreError
from reconciler.serving import AnyServer, ListenError, make_server
from reconciler.tls import (
    PLAIN_HTTP_WARNING,
    ClientTLS,
    PlainHttpRefused,
    TLSConfigError,
    check_url_scheme,
    client_session,
    client_tls_of,
    server_context,
    server_tls_of,
)
from reconciler.webhook import read_secret_file

log = logging.getLogger("reconciler.relay")

POLL_SECONDS_ENV = "RECONCILER_POLL_SECONDS"
WEBHOOK_SECRET_ENV = "RECONCILER_WEBHOOK_SECRET_FILE"
LISTEN_FILE = "listen.url"
HOUSEKEEPING_SECONDS = 3600.0


class StartupError(Exception):
    """The relay cannot start (exit 2): another relay holds its workdir."""


# ------------------------------------------------------------------ settings


def poll_seconds_from_env(default: float = DEFAULT_POLL_SECONDS) -> float:
    """``RECONCILER_POLL_SECONDS`` if it is a positive number of at most a day, else ``default``."""
    raw = os.environ.get(POLL_SECONDS_ENV)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not a number", POLL_SECONDS_ENV, raw)
        return default
    if not 0 < value <= protocol.MAX_POLL_SECONDS:  # nan, inf and 1e10 too: agents would refuse the reply
        log.warning("ignoring %s=%r: not a number of seconds from 0 to %d", POLL_SECONDS_ENV, raw,
                    protocol.MAX_POLL_SECONDS)
        return default
    return value


def load_webhook_secret(path: str | None = None) -> bytes | None:
    """The webhook secret in ``path`` (``--webhook-secret-file``), else in the file named by
    ``RECONCILER_WEBHOOK_SECRET_FILE``; None when neither is set (hooks are then refused unless
    ``--insecure-unsigned-webhook``)."""
    path = path or os.environ.get(WEBHOOK_SECRET_ENV)
    return read_secret_file(path) if path else None


def trust_from_args(args: argparse.Namespace) -> Trust:
    """The relay's :class:`Trust` from its options; :class:`StartupError` (exit 2) naming what is wrong."""
    secret_file: str | None = getattr(args, "enroll_secret_file", None)
    open_enrollment = bool(getattr(args, "open_enrollment", False))
    if secret_file and open_enrollment:
        raise StartupError("--enroll-secret-file and --open-enrollment exclude each other: with open enrolment "
                           "the secret would admit nobody the relay does not admit anyway")
    if not secret_file and not open_enrollment:
        raise StartupError("no way for clients to enrol: give --enroll-secret-file F (agents present the same "
                           "secret with their --enroll-secret-file) or, to let any caller that reaches the relay "
                           "register a client id (trust on first use), --open-enrollment")
    try:
        secret = read_header_secret(secret_file) if secret_file else None
        child_secret_file: str | None = getattr(args, "child_secret_file", None)
        child_secret = read_header_secret(child_secret_file) if child_secret_file else None
    except SecretFileError as e:
        raise StartupError(str(e)) from None
    return Trust(enroll_secret=secret, open_enrollment=open_enrollment,
                 require_approval=bool(getattr(args, "require_approval", False)), child_secret=child_secret)


def relay_server(app: RelayApp, listen: str, tls: ssl.SSLContext | None = None) -> AnyServer:
    """The server of the client API, bound to ``listen`` (not yet started).

    Sized for thousands of agents polling one relay: 8 worker threads, up to
    2,000 open connections, and waitress's "task queue depth" warning muted
    (requests queued behind busy workers are normal under load). Bodies above
    1 MiB get the app's own JSON 413; the server only refuses absurd uploads.
    HTTPS with ``tls`` (cheroot), plain HTTP without (waitress).
    """
    return make_server(app, listen, tls=tls, name="relay-http", ident="reconciler-relay", threads=8,
                  connection_limit=2000, backlog=1024, channel_timeout=120,
                  max_request_body_size=16 * protocol.MAX_BODY, quiet_queue=True)


@dataclass(frozen=True)
class TLSSettings:
    """The relay's TLS: the server context of its client API (None: plain HTTP), and what it trusts and presents
    towards its parent relay and HQ."""

    server: ssl.SSLContext | None
    outgoing: ClientTLS


def tls_settings(args: argparse.Namespace) -> TLSSettings:
    """The TLS options of ``reconciler relay``, checked; TLSConfigError or PlainHttpRefused (exit 2)."""
    server_tls = server_tls_of(args.tls_cert, args.tls_key, args.tls_client_ca)
    insecure = bool(getattr(args, "insecure_http", False))
    if server_tls is None and not insecure:
        raise PlainHttpRefused("give --tls-cert and --tls-key to serve HTTPS, or --insecure-http to serve plain HTTP")
    for url, flag in ((args.parent_url, "--parent-url"), (args.hq_url, "--hq-url")):
        if url:
            check_url_scheme(url, flag, insecure)
    return TLSSettings(server_context(server_tls) if server_tls is not None else None,
                       client_tls_of(args.ca_file, args.client_cert, args.client_key))


# ------------------------------------------------------------------ the process


def relay_metrics(state: RelayState, cache: ArtifactCache) -> RelayMetrics:
    """The relay's metrics; its gauges read ``state`` (the last full pass) and the cache directory when scraped."""
    metrics = RelayMetrics()

    def snapshot() -> Iterator[Metric]:
        yield row_gauge(sorted(state.row_counts.items()))
        online = state.clients_online
        yield gauge("reconciler_clients", "Registered clients of this relay by state (online: checked in within "
                    "the online window), as the last full pass counted them", ("relay", "state"),
                    [((state.name, "online"), online), ((state.name, "offline"), state.client_count - online)])
        yield gauge("reconciler_artifact_cache_bytes", "Bytes of the artifacts in the relay's cache", (),
                    [((), cache.size_bytes())])

    metrics.add_snapshot(snapshot)
    return metrics


def _lock_workdir(workdir: Path) -> Any:
    """Hold an exclusive lock on ``<workdir>/relay.lock``: two relays must never share a database."""
    handle = open(workdir / "relay.lock", "a+")  # noqa: SIM115 - held for the process's life
    try:
        import fcntl
    except ImportError:  # Windows: the SQLite file itself is locked while open
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise StartupError(f"another relay is running with workdir {workdir}") from None
    return handle


def _write_listen_file(workdir: Path, url: str) -> None:
    target = workdir / LISTEN_FILE
    temp = workdir / f".{LISTEN_FILE}.{os.getpid()}.tmp"
    temp.write_text(url + "\n", encoding="utf-8")
    os.replace(temp, target)


class _Wakeup:
    """What the loop should do next: fetch (git changed or poll), pass (state dirty)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.fetch = True
        self.dirty = True

    def request_fetch(self) -> None:
        self.fetch = True
        self.event.set()

    def mark_dirty(self) -> None:
        self.dirty = True
        self.event.set()


def main(args: argparse.Namespace) -> int:
    """Run ``reconciler relay`` until SIGTERM or SIGINT: 0 then, 2 when it cannot start."""
    configure_logging()
    # SQLite (with its WAL), the artifact cache, the git mirror, listen.url: owner-only (0600/0700)
    os.umask(0o077)
    name: str = args.name
    if not names.is_name(name):
        print(f"reconciler relay: invalid relay name {name!r}", file=sys.stderr)
        return 2
    try:
        tls = tls_settings(args)
    except (TLSConfigError, PlainHttpRefused) as e:
        print(f"reconciler relay: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir).absolute()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        lock = _lock_workdir(workdir)
    except (OSError, StartupError) as e:
        print(f"reconciler relay: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args, name, workdir, tls)
    finally:
        lock.close()


def _run(args: argparse.Namespace, name: str, workdir: Path, tls: TLSSettings) -> int:
    try:
        trust = trust_from_args(args)
        parent_secret = read_header_secret(args.parent_secret_file) if args.parent_secret_file else None
    except (StartupError, SecretFileError) as e:
        print(f"reconciler relay: {e}", file=sys.stderr)
        return 2
    if trust.open_enrollment:
        log.warning("open enrolment: any caller that reaches %s can register a client id and get its token "
                    "(trust on first use); use --enroll-secret-file to admit only enrolled agents", args.listen)
    if parent_secret is not None and not args.parent_url:
        log.warning("--parent-secret-file without --parent-url: this relay has no parent to present it to")
    try:
        store = Store(workdir, synchronous=getattr(args, "sqlite_synchronous", None))
    except StoreError as e:
        print(f"reconciler relay: {e}", file=sys.stderr)
        return 2
    native_heap.limit_arenas()  # before any thread starts (see native_heap)
    wake = _Wakeup()
    stop = threading.Event()
    checkin: float | None = getattr(args, "checkin_interval", None)
    poll_seconds = checkin if checkin is not None else poll_seconds_from_env()
    state = RelayState(name, store, poll_seconds=poll_seconds, on_change=wake.mark_dirty,
                       offline_after=args.offline_after, retire_after=timedelta(days=args.retire_after))
    try:
        password = origin_password(getattr(args, "origin_password_file", None))
    except (OSError, ValueError) as e:
        print(f"reconciler relay: cannot read the origin password: {e}", file=sys.stderr)
        store.close()
        return 2
    warning = url_credentials_warning(args.origin, password is not None)
    if warning:
        log.warning("%s", warning)
    git = GitStore(args.origin, workdir, password=password,
                   history=history_of(args.status_history_days, args.status_history_commits))
    cache = ArtifactCache(workdir, git, parent_url=args.parent_url, parent_secret=parent_secret,
                          parent_session=client_session(tls.outgoing))
    loop = RelayLoop(name, git, store, cache, state, publish_interval=args.publish_interval,
                     inventory_interval=args.inventory_interval)
    # Full passes run in a process of their own (started at the first pass): check-ins keep this one's GIL.
    passes: PassProcess | None = None
    if os.name == "posix":  # a child handed a socket at spawn
        passes = loop.passes = PassProcess(PassSettings(
            name=name, workdir=workdir, synchronous=getattr(args, "sqlite_synchronous", None),
            poll_seconds=poll_seconds, offline_after=args.offline_after, retire_after=state.retire_after,
            inventory_interval=args.inventory_interval), state, store)
    metrics = relay_metrics(state, cache)
    git.metrics = cache.metrics = loop.metrics = metrics
    watcher = ChangeWatcher(args.origin, args.poll_interval)
    state.on_git_hook = watcher.trigger

    # Start-up check: a relay name the accepted topology does not know is an operator error.
    accepted = loop.read_accepted()
    if accepted.specs is not None and not loop.known_relay(accepted.specs):
        relays = ", ".join(sorted(r.name for r in accepted.specs.topology.relays)) or "none"
        print(f"reconciler relay: relay {name!r} is not in the topology at accepted commit "
              f"{(accepted.commit or '')[:12]} (relays: {relays})", file=sys.stderr)
        store.close()
        return 2
    if accepted.error:
        log.warning("%s", accepted.error.message)

    try:
        secret = load_webhook_secret(args.webhook_secret_file)
    except (OSError, ValueError) as e:
        print(f"reconciler relay: cannot read the webhook secret: {e}", file=sys.stderr)
        store.close()
        return 2
    heartbeats: HeartbeatSender | None = None
    if args.hq_url:
        try:
            heartbeat_secret = read_secret_file(args.heartbeat_secret_file) if args.heartbeat_secret_file else None
        except (OSError, ValueError) as e:
            print(f"reconciler relay: cannot read the heartbeat secret: {e}", file=sys.stderr)
            store.close()
            return 2
        heartbeats = HeartbeatSender(args.hq_url, state, interval=args.heartbeat_interval, secret=heartbeat_secret,
                                     session=client_session(tls.outgoing))
    elif args.heartbeat_secret_file:
        log.warning("--heartbeat-secret-file without --hq-url: this relay sends no heartbeats")
    insecure = bool(args.insecure_unsigned_webhook) and secret is None
    if secret is None and not insecure:
        log.warning("no webhook secret: POST /v1/hooks/git is refused (give --webhook-secret-file, or "
                    "--insecure-unsigned-webhook); changes are picked up every --poll-interval")
    app = RelayApp(state, cache.dir, webhook_secret=secret, insecure_webhook=insecure, trust=trust,
                   metrics=metrics)
    try:
        server = relay_server(app, args.listen, tls.server).start()
    except (ListenError, OSError) as e:
        print(f"reconciler relay: cannot listen on {args.listen}: {e}", file=sys.stderr)
        store.close()
        return 2
    if tls.server is None:
        log.warning("%s", PLAIN_HTTP_WARNING)
    _write_listen_file(workdir, server.url)
    log.info("relay %s listening on %s (origin %s, poll %ss for clients; enrolment: %s%s)", name, server.url,
             redact_url(args.origin), f"{poll_seconds:g}", "open" if trust.open_enrollment else "secret",
             ", approval required" if trust.require_approval else "")

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        wake.event.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def watch() -> None:
        while not stop.is_set():
            watcher.wait()  # a change, a webhook, or the poll interval: fetch either way
            if not stop.is_set():
                wake.request_fetch()

    watcher.start()
    watch_thread = threading.Thread(target=watch, name="relay-watch", daemon=True)
    watch_thread.start()
    pass_interval = max(args.publish_interval, min(poll_seconds, 60.0))

    def next_pass_after(finished: float) -> float:
        """When a pass is due with no new input: the loop's timers (README, "Scaling out")."""
        at = loop.timer_at
        if loop.ticking or loop.inventory_interval <= 0:
            at = min(at, finished + pass_interval)
        due = loop.detail_due_in()
        if due is not None:
            at = min(at, time.monotonic() + due)
        return max(at, finished + float(args.publish_interval))
    next_pass = 0.0
    last_pass = float("-inf")
    next_restage: float = float("inf")
    next_housekeeping = time.monotonic() + 60.0
    next_events = 0.0  # when to look for client events again (once per check-in interval)
    # Last-seen times of check-ins that changed nothing wait in memory (Store.flush_seen): at most this long.
    store.flush_interval = min(SEEN_FLUSH_SECONDS, state.online_window().total_seconds() / 4)
    next_flush = time.monotonic() + store.flush_interval
    try:
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_flush:
                next_flush = now + store.flush_interval
                try:
                    store.flush_seen()
                except Exception:  # noqa: BLE001 - kept in memory, tried again at the next deadline
                    log.exception("writing last-seen times failed")
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_SECONDS
                try:
                    loop.housekeeping()
                    loop.settle(HOUSEKEEPING, None)
                except Exception as e:  # noqa: BLE001 - a bug in one round must not end the service
                    loop.settle(HOUSEKEEPING, e)
            fetch, wake.fetch = wake.fetch, False
            if now >= next_events:
                next_events = now + poll_seconds
                try:
                    if loop.clients_changed():  # an operator's `reconciler clients` change, from another process
                        wake.dirty = True
                except Exception as e:  # noqa: BLE001
                    loop.settle(FOLLOW, e)
            if fetch or loop.retry_due():
                try:
                    if loop.sync(fetch=fetch):
                        wake.dirty = True
                except Exception as e:  # noqa: BLE001
                    loop.settle(FOLLOW, e)
            next_restage = loop.retry_at if loop.retry_at is not None else float("inf")
            throttle = last_pass + args.publish_interval
            if (wake.dirty and now >= throttle) or now >= next_pass:
                wake.dirty = False
                try:
                    loop.last_files = loop.full_pass()
                except Exception as e:  # noqa: BLE001 - publish the error rather than nothing
                    try:
                        loop.last_files = loop.error_files(e)
                    except Exception:  # noqa: BLE001
                        log.exception("rendering the error status failed")
                last_pass = time.monotonic()
                next_pass = next_pass_after(last_pass)
                if heartbeats is not None:
                    heartbeats.start()  # after the first pass: its first heartbeat counts the clients
            try:
                loop.publish()
            except Exception as e:  # noqa: BLE001
                loop.settle(PUBLISHING, e)
            deadlines = [next_pass, next_restage, next_housekeeping, next_events, next_flush]
            if wake.dirty:
                deadlines.append(last_pass + args.publish_interval)
            due = loop.publish_due_in()
            if due is not None:
                deadlines.append(time.monotonic() + due)
            timeout = max(0.01, min(deadlines) - time.monotonic())
            wake.event.wait(timeout)
            wake.event.clear()
    finally:
        log.info("relay %s stopping", name)
        if heartbeats is not None:
            heartbeats.stop()
        watcher.stop()
        server.stop()
        if passes is not None:
            passes.close()
        try:
            store.flush_seen()  # served check-ins are done: their last-seen times are written
        except Exception:  # noqa: BLE001
            log.exception("writing last-seen times at shutdown failed")
        store.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        (workdir / LISTEN_FILE).unlink(missing_ok=True)
    return 0
