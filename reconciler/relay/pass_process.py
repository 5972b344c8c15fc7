"""A relay's full passes in a process of their own, so that passes and check-ins each hold a GIL.

At 50,000 clients a full pass is seconds of Python. Inside the serving
process it holds the one GIL half the time, and check-ins are served at half
their rate for as long as it runs. In a child process it runs on the
other core.

:class:`PassProcess` runs passes in that child, as :class:`~reconciler.relay.loop.RelayLoop`'s
:class:`~reconciler.relay.full_pass.Passes`. For each pass it sends the
generation the relay serves (only when it changed since the last it sent,
and without the trust bundle, which planning does not read) and the
problems the status files list. The child holds a
:class:`~reconciler.relay.full_pass.FullPass` on its own connection to the
relay's SQLite file, writes the status files that changed into the relay's
git mirror itself (:meth:`~reconciler.gitstore.GitStore.store_blobs`), and
answers with a :class:`~reconciler.relay.full_pass.PassResult` whose files
are blob ids (:class:`~reconciler.gitstore.Blob`): the serving process
publishes them without ever holding their bytes (tens of MB at 50,000
clients). Should the mirror lose a blob before it is published (a gc), the
publish fails and the next pass writes every file again. Jobs the child finds
unplannable are left out of the generation the relay serves, as an
in-process pass would. A generation that cannot be pickled (a bug: specs are
plain data) is planned in the relay's own process, and said once in the log.

The child reads SQLite and adds objects to the git mirror; it never writes a
ref, fetches or pushes. Before each pass the serving process writes the
last-seen times it holds in memory (:meth:`~reconciler.relay.store.Store.flush_seen`).

The child is ``python -c`` importing this module, in a session of its own (a
terminal's Ctrl-C reaches the relay, which stops it), speaking pickled
messages over a socket pair (:class:`multiprocessing.connection.Connection`).
It ends with its parent: it waits on the socket and ends when it closes.
When it dies (killed, out of memory) or does not answer within
:data:`PASS_TIMEOUT_SECONDS`, that pass fails with an error the status files
show, and the next pass starts a new child.
"""

from __future__ import annotations

import logging
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from types import MappingProxyType
from typing import Any

from reconciler.errors import Cause, Problem, ReconcilerError, problem_of
from reconciler.gitstore import GitStore
from reconciler.logs import configure_logging
from reconciler.relay import native_heap
from reconciler.relay.full_pass import FullPass, PassResult
from reconciler.relay.state import Generation, RelayState
from reconciler.relay.store import Store
from reconciler.times import utc_now

log = logging.getLogger("reconciler.relay")

PASS_TIMEOUT_SECONDS = 900.0  # a child that has not answered by then is killed (50,000 clients take seconds)
STOP_SECONDS = 10.0  # how long a stopping child may take to end before it is killed
# The child imports this very reconciler (argv[2]: the directory holding it), whatever directory it runs in.
_CHILD_CODE = ("import sys; sys.path.insert(0, sys.argv[2]); "
               "from reconciler.relay.pass_process import child_main; child_main(int(sys.argv[1]))")
_IMPORT_ROOT = Path(__file__).resolve().parent.parent.parent


def _mapping_proxy(content: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(content)


def _reduce_mapping_proxy(proxy: MappingProxyType[Any, Any],
                          ) -> tuple[Callable[[dict[Any, Any]], MappingProxyType[Any, Any]], tuple[dict[Any, Any]]]:
    return _mapping_proxy, (dict(proxy),)


# Specs keep read-only mappings (MappingProxyType), which pickle cannot copy on its own.
ForkingPickler.register(MappingProxyType, _reduce_mapping_proxy)


@dataclass(frozen=True)
class PassSettings:
    """What the child needs to open the relay's database and count its clients as the relay does."""

    name: str
    workdir: Path  # the relay's: its SQLite file and its git mirror
    synchronous: str | None
    poll_seconds: float
    offline_after: float | None
    retire_after: timedelta
    inventory_interval: float


@dataclass(frozen=True)
class _Request:
    generation: Generation | None  # None: the one sent before
    earlier: tuple[Problem, ...]
    later: tuple[Problem, ...]
    rerender: bool  # render every file again and write every blob again (one may be gone from the mirror)


@dataclass(frozen=True)
class _Failed:
    problem: Problem  # the pass raised: why, as the status files show it


class PassFailed(ReconcilerError):
    """The child could not run the pass: it raised, died or did not answer."""


class PassProcess:
    """Runs a relay's full passes in a child process; see the module docstring."""

    def __init__(self, settings: PassSettings, state: RelayState, store: Store, *,
                 timeout: float = PASS_TIMEOUT_SECONDS) -> None:
        self.settings = settings
        self.state = state
        self.store = store
        self.timeout = timeout
        self._child: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._sent: Generation | None = None  # the generation the child plans with
        self._rerender = False
        self._local: FullPass | None = None  # passes in this process (see _here)
        self._unsendable: Generation | None = None  # the generation that could not be sent: planned here

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._child.pid if self._child is not None and self._child.poll() is None else None

    def forget_render(self) -> None:
        self._rerender = True

    def run(self, earlier: Sequence[Problem] = (), later: Sequence[Problem] = ()) -> PassResult:
        self.store.flush_seen()  # the child reads the clients from SQLite only, not this process's memory
        generation = self.state.generation
        if generation is self._unsendable:
            return self._here().run(earlier, later)
        conn = self._start()
        request = _Request(None if generation is self._sent else replace(generation, trust=None),
                           tuple(earlier), tuple(later), self._rerender)
        try:
            conn.send(request)
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # nothing was sent: the child waits on
            log.error("the generation of %s cannot be handed to the pass process (%s: %s): planning in the relay's "
                      "own process", (generation.commit or "no commit")[:12], type(e).__name__, e)
            self._unsendable = generation
            return self._here().run(earlier, later)
        except OSError:
            pass  # the child is gone: its answer is missing below
        try:
            if not conn.poll(self.timeout):
                self._stop(kill=True)
                raise PassFailed(f"the pass process did not answer within {self.timeout:g}s: stopped, a new one "
                                 f"starts at the next pass", Cause.TIMEOUT)
            answer = conn.recv()
        except (EOFError, OSError) as e:
            code = None
            if self._child is not None:
                try:
                    code = self._child.wait(STOP_SECONDS)  # its socket closed as it ended: it has just ended
                except subprocess.TimeoutExpired:
                    pass
            self._stop(kill=True)
            raise PassFailed(f"the pass process ended unexpectedly ({self._ended(code, e)}); a new one starts at "
                             f"the next pass", Cause.INTERNAL) from None
        self._sent, self._rerender = generation, False
        if isinstance(answer, _Failed):
            raise PassFailed(answer.problem.message, answer.problem.cause)
        assert isinstance(answer, PassResult)
        if answer.unplannable != dict(generation.unplannable):
            self.state.leave_out(generation, answer.unplannable)
        return answer

    def _here(self) -> FullPass:
        """A pass in this process, for what cannot be handed to the child."""
        if self._local is None:
            self._local = FullPass(self.settings.name, self.store, self.state,
                                   inventory_interval=self.settings.inventory_interval, clock=utc_now,
                                   monotonic=time.monotonic)
        if self._rerender:
            self._local.forget_render()
            self._rerender = False
        return self._local

    def close(self) -> None:
        """Stop the child (it ends when its socket closes); kill it if it does not end in time."""
        self._stop(kill=False)

    def _start(self) -> Connection:
        if self._conn is not None and self._child is not None and self._child.poll() is None:
            return self._conn
        self._stop(kill=True)
        ours, theirs = socket.socketpair()
        with theirs:
            # Its own session: a terminal's Ctrl-C reaches the relay, which stops the child.
            child = subprocess.Popen([sys.executable, "-c", _CHILD_CODE, str(theirs.fileno()), str(_IMPORT_ROOT)],
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True)
        conn = Connection(ours.detach())
        self._child, self._conn = child, conn
        self._sent = None
        try:
            conn.send(self.settings)
        except OSError:
            pass  # it ended already: the pass's request finds out
        log.info("full passes run in process %s", child.pid)
        return conn

    def _stop(self, kill: bool) -> None:
        child, conn = self._child, self._conn
        self._child = self._conn = None
        if conn is not None:
            conn.close()  # the child's recv ends: it exits
        if child is None:
            return
        if kill:
            child.kill()
        try:
            child.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(STOP_SECONDS)
        GitStore.adding_objects(self.settings.workdir).remove_stale_scratch()  # what it was writing, if killed

    @staticmethod
    def _ended(code: int | None, error: BaseException) -> str:
        if code is None:
            return f"{type(error).__name__}"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"


def child_main(fd: int) -> None:
    """The child process: its settings, then pass requests, on the socket ``fd``, until it closes."""
    conn = Connection(fd)
    try:
        settings = conn.recv()
    except (EOFError, OSError):
        return
    assert isinstance(settings, PassSettings)
    serve(conn, settings)


def serve(conn: Connection, settings: PassSettings) -> None:
    """Answer pass requests on ``conn`` until it closes."""
    configure_logging()
    native_heap.limit_arenas()
    store = Store(settings.workdir, synchronous=settings.synchronous)
    state = RelayState(settings.name, store, poll_seconds=settings.poll_seconds,
                       offline_after=settings.offline_after, retire_after=settings.retire_after)
    passes = FullPass(settings.name, store, state, inventory_interval=settings.inventory_interval,
                      clock=utc_now, monotonic=time.monotonic)
    mirror = GitStore.adding_objects(settings.workdir)
    try:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return
            assert isinstance(request, _Request)
            if request.generation is not None:
                state.generation = request.generation
            if request.rerender:
                passes.forget_render()
                mirror.forget_blobs()
            answer: PassResult | _Failed
            try:
                result = passes.run(request.earlier, request.later)
                answer = replace(result, files=mirror.store_blobs(result.files))
            except Exception as e:  # noqa: BLE001 - the parent publishes it as the pass's error
                found = problem_of(e)
                log.error("full pass failed: %s", found.message, exc_info=None if isinstance(e, ReconcilerError) else e)
                answer = _Failed(found)
            try:
                conn.send(answer)
            except OSError:
                return
    finally:
        store.close()

