"""Plan engine: desired state per client, the diff to actual, and the actions.

A pure function (no git, network, disk or clock: the caller passes ``now``)
from the accepted specs, one relay, its clients' reported facts and
inventory, and the relay's record of past attempts, to one row per
(job, client) with its state and a machine-readable :class:`Reason`, and
the actions that close the gap. The package's rooms:

* :mod:`~reconciler.plan.vocabulary`: states, reasons, rows, actions,
  attempts, and how a job's rows roll up to a job state;
* :mod:`~reconciler.plan.rules`: the rules of DESIGN section 4 as plain,
  readable code, one client after another: the oracle;
* :mod:`~reconciler.plan.engine`: the same rules computed fast for a whole
  relay (shared decisions, replays), checked against the oracle by the
  properties in ``tests/test_plan_properties.py``;
* :mod:`~reconciler.plan.index`: the specs as one relay plans with them;
* :mod:`~reconciler.plan.identity`: plan revisions and operation ids.

INTERFACE CONTRACT (the relay is written against these names):

* ``index_relay(specs, relay, reach, staged=, unavailable=) -> RelayIndex``
  once per accepted commit and artifact state.
* ``plan_client(index, client, history, usage, now, memo) -> ClientPlan`` on
  every check-in: only that client's data plus the per-job rollout usage
  counted on the other clients' rows. Its actions are handed out in the
  check-in reply, so rows that get a new action are ``InProgress``.
* ``plan_relay(index, clients, history, now, memo) -> Plan`` for a full pass
  (status publishing, ``reconciler plan``). It previews: a row that would
  start at the client's next check-in is ``Pending`` (reason ``queued``)
  with its action. ``Plan.usage`` is the rollout usage on its rows.
* ``rollup(job, rows) -> JobRollup`` per job; ``parked(reasons)`` and
  ``job_state(counts, ...)`` for roll-ups of counts (HQ).
"""

from reconciler.plan.engine import PlanMemo, plan_client, plan_relay
from reconciler.plan.identity import operation_id, plan_revision
from reconciler.plan.index import RelayIndex, index_relay
from reconciler.plan.vocabulary import (
    MAX_BACKOFF_SECONDS,
    REBOOT_MESSAGE,
    RESULT_MARGIN_SECONDS,
    Action,
    ActionKind,
    Attempt,
    Client,
    ClientId,
    ClientPlan,
    ClientState,
    History,
    Installed,
    JobRollup,
    JobState,
    OperationId,
    Outcome,
    Plan,
    Reason,
    RolloutUsage,
    Row,
    count_states,
    failures_exceeded,
    job_state,
    parked,
    parse_max_failures,
    rollup,
    waits_for_reboot,
)

__all__ = [
    "MAX_BACKOFF_SECONDS", "REBOOT_MESSAGE", "RESULT_MARGIN_SECONDS", "Action", "ActionKind", "Attempt", "Client",
    "ClientId",
    "ClientPlan", "ClientState", "History", "Installed", "JobRollup", "JobState", "OperationId", "Outcome", "Plan",
    "PlanMemo", "RelayIndex", "RolloutUsage", "Row", "count_states", "failures_exceeded", "index_relay", "operation_id",
    "Reason", "job_state", "parked", "parse_max_failures", "plan_client", "plan_relay", "plan_revision",
    "rollup", "waits_for_reboot",
]
