"""The relay's heartbeat to HQ: proof of life without a git commit.

Every ``--heartbeat-interval`` seconds a thread of its own posts
``{hq-url}/v1/relays/<relay>/heartbeat`` (:mod:`reconciler.liveness` has the
body): the accepted commit the relay serves, its clients online and offline
as of its last full pass, and its current errors. HQ publishes a relay as
lost when heartbeats stop, and as alive again when they resume; heartbeats
themselves never reach git.

The thread never holds up a check-in or the loop: it reads values the loop
has already computed (:class:`~reconciler.relay.state.RelayState`), and a
post gives up after :data:`SEND_TIMEOUT_SECONDS` (or half the interval, if
shorter). A failure is never fatal and is logged once per change (HQ
unreachable, then HTTP 401, then delivered again), not at every interval.
With ``--heartbeat-secret-file`` the body is signed like a git webhook
(HMAC-SHA256 in ``X-Hub-Signature-256``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import datetime

import requests

from reconciler.liveness import ClientCounts, heartbeat_json, make_heartbeat
from reconciler.redaction import redact_text, redact_url, url_secrets
from reconciler.relay.state import RelayState
from reconciler.times import utc_now
from reconciler.tls import tls_problem
from reconciler.webhook import SIGNATURE_HEADER, sign

log = logging.getLogger("reconciler.relay")

SEND_TIMEOUT_SECONDS = 10.0
DETAIL_CHARS = 200
DELIVERED = "delivered"


class HeartbeatSender:
    """Posts the relay's heartbeat to HQ every ``interval`` seconds on a daemon thread, until :meth:`stop`."""

    def __init__(self, hq_url: str, state: RelayState, *, interval: float, secret: bytes | None = None,
                 clock: Callable[[], datetime] = utc_now, session: requests.Session | None = None) -> None:
        self.url = f"{hq_url.rstrip('/')}/v1/relays/{state.name}/heartbeat"
        self.shown_url = redact_url(self.url)
        self.state = state
        self.interval = interval
        self.timeout = min(SEND_TIMEOUT_SECONDS, max(0.5, interval / 2))
        self.secret = secret
        self.clock = clock
        self.outcome: str | None = None  # DELIVERED or the kind of the last failure, as last logged
        self._session = session or requests.Session()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay-heartbeat", daemon=True)

    def body(self) -> bytes:
        """The heartbeat as of now, from what the loop last computed."""
        state = self.state
        total = state.client_count
        online = min(state.clients_online, total)
        heartbeat = make_heartbeat(state.name, state.generation.commit, ClientCounts(total, online, total - online),
                                   state.errors, self.clock())
        return json.dumps(heartbeat_json(heartbeat), sort_keys=True).encode("utf-8")

    def send(self) -> str:
        """Post one heartbeat; :data:`DELIVERED` or the kind of failure (logged when it differs from the last)."""
        body = self.body()
        headers = {"Content-Type": "application/json"}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        try:
            response = self._session.post(self.url, data=body, headers=headers, timeout=self.timeout)
        except requests.Timeout:
            return self._settle("timeout", f"no answer within {self.timeout:g}s")
        except requests.RequestException as e:
            problem = tls_problem(e)
            if problem is not None:
                return self._settle("TLS", problem)
            return self._settle("unreachable", f"{type(e).__name__}: {e}")
        if response.status_code == 200:
            return self._settle(DELIVERED, "")
        try:
            detail = str(response.json().get("error", ""))
        except ValueError:
            detail = response.text
        return self._settle(f"HTTP {response.status_code}", detail)

    def _settle(self, outcome: str, detail: str) -> str:
        previous, self.outcome = self.outcome, outcome
        if outcome == previous:
            return outcome
        if outcome == DELIVERED:
            if previous is None:
                log.info("heartbeats reach HQ at %s (every %gs)", self.shown_url, self.interval)
            else:
                log.info("heartbeats reach HQ again at %s", self.shown_url)
        else:
            text = redact_text(" ".join(detail.split()), url_secrets(self.url))
            text = text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 1] + "…"
            log.warning("heartbeat to HQ at %s failed (%s%s); retrying every %gs, logged again when this changes",
                        self.shown_url, outcome, f": {text}" if text else "", self.interval)
        return outcome

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.send()
            except Exception:  # noqa: BLE001 - a bug here must not end the relay's heartbeats for good
                log.exception("sending a heartbeat failed")
            self._stop.wait(self.interval)

    def start(self) -> HeartbeatSender:
        """Start the thread (once; later calls do nothing)."""
        if self._thread.ident is None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=self.timeout + 1)
        self._session.close()
