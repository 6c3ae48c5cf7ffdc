"""The lifecycle of one worker slot: its incarnations, its phase, its recycle and its backoff.

A `SlotLifecycle` is a state machine in one object. Its methods take events (a worker spawned,
said hello, became ready, exited; missed heartbeats, hung; a recycle verdict, an operator's
recycle, shutdown; a spare spawned, said hello, exited; the clock's tick) and return actions (`Spawn`,
`StopWorker`, `KillWorker`, `Accept`, `Log`, `Count`, `RecycleStarted`, `Save`, and for the spare
`SpawnSpare`, `LoadSpare`, `StopSpare`, `KillSpare`) that the `Supervisor` carries out. It makes no OS or
socket call and reads no clock: `now` is passed in, so it is tested in-process with a fake clock
(`tests/unit/test_lifecycle.py`). Nothing else changes a slot's workers, recycle or backoff.

Phases of a slot (`Phase`):

    waiting --tick(backoff over, nothing retiring)--> starting --ready--> serving
    serving --verdict / recycle--> recycle_wanted --tick(its turn)--> overlapping (successor loads)
                                                                  \\-> starting | waiting (old one drains)
    overlapping --successor ready--> serving (the old one drains)
    any --too many crashes, or a permanent exit code--> failed --tick(capped backoff)--> starting
    any --shutdown--> stopped

At most two model processes live per slot, and only one when `recycle_overlap = never`
(`max_live`): a recycle starts only once no earlier worker is still draining.

Spares (`spare_workers`): beside its model processes a slot keeps at most one `Spare`, a process
that has imported torch, transformers and the engine and waits, holding no device memory:

    (none) --tick(the slot serves, nothing imports, spare backoff over)--> starting --hello--> waiting
    waiting --a new worker is wanted--> used: `LoadSpare` makes it that incarnation (spawning)
    starting | waiting --exited--> (none), the next one after a backoff (never a crash of the slot)
    starting --start timeout--> killed;  any --shutdown--> stopping

Every new incarnation comes from `_new_worker`, which loads the spare when one waits and starts a
cold process otherwise. A spare never takes a request: only incarnations are dispatched to.
"""

from __future__ import annotations

import collections
import enum
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from qvl.protocol.exits import describe, is_permanent

from .config import Config
from .policy import Verdict


class WorkerState(enum.Enum):
    SPAWNING = "spawning"  # process started, not yet connected
    LOADING = "loading"    # connected (hello), loading the model
    READY = "ready"        # loaded; serving while it is its slot's current worker
    DRAINING = "draining"  # finishing its in-flight requests, takes no new ones
    STOPPING = "stopping"  # asked to exit; the process wrapper escalates to signals
    EXITED = "exited"


STARTING = (WorkerState.SPAWNING, WorkerState.LOADING)


class SpareState(enum.Enum):
    STARTING = "starting"  # importing torch, transformers and the engine
    WAITING = "waiting"    # imported and connected (hello): loads the model when told to
    STOPPING = "stopping"  # shutting down


class Phase(enum.Enum):
    WAITING = "waiting"                # no worker: the next starts once the restart backoff is over
    STARTING = "starting"              # its worker loads; nothing serves
    SERVING = "serving"
    RECYCLE_WANTED = "recycle_wanted"  # its worker serves (unless the verdict was hard) until its turn
    OVERLAPPING = "overlapping"        # its worker serves while the successor loads
    FAILED = "failed"                  # no worker; tries again after a capped backoff
    STOPPED = "stopped"                # shutting down: starts nothing


@dataclass(eq=False)
class Incarnation:
    """One worker process as the lifecycle sees it: its number and state, never its process."""

    generation: int
    state: WorkerState
    since: float
    pid: int | None = None
    accepting: bool = False  # dispatch may hand it requests
    killed: bool = False
    started_for: str = ""    # why it was started, logged once its pid is known


@dataclass(eq=False)
class Spare:
    """A slot's spare process: its number (its identity among the slot's spares) and state."""

    number: int
    state: SpareState
    since: float
    pid: int | None = None
    killed: bool = False


@dataclass
class Recycle:
    reason: str
    hard: bool        # its worker takes no new request from the verdict on
    wait_idle: bool   # a soft policy reason: start once the worker is idle, or waited long enough
    since: float
    started_at: float | None = None
    overlap: bool = False
    failed_starts: int = 0  # successors that could not start


# --- actions -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spawn:
    worker: Incarnation  # start its generation's process, then report `spawned` with its pid


@dataclass(frozen=True)
class SpawnSpare:
    number: int  # start a spare process, then report `spare_spawned` with its pid


@dataclass(frozen=True)
class LoadSpare:
    number: int
    worker: Incarnation  # the spare becomes this incarnation: send it the spec of its generation


@dataclass(frozen=True)
class StopSpare:
    number: int
    reason: str


@dataclass(frozen=True)
class KillSpare:
    number: int
    reason: str


@dataclass(frozen=True)
class StopWorker:
    generation: int
    reason: str


@dataclass(frozen=True)
class KillWorker:
    generation: int
    reason: str


@dataclass(frozen=True)
class Accept:
    generation: int
    on: bool


@dataclass(frozen=True)
class Log:
    name: str
    fields: dict
    level: int = logging.INFO


@dataclass(frozen=True)
class Count:
    key: str


@dataclass(frozen=True)
class RecycleStarted:
    reason: str


@dataclass(frozen=True)
class Save:
    pass


Action = (Spawn | StopWorker | KillWorker | Accept | Log | Count | RecycleStarted | Save
          | SpawnSpare | LoadSpare | StopSpare | KillSpare)


def restart_delay(recent_crashes: int, config: Config) -> float:
    """Exponential backoff: the first restart waits `restart_backoff_s`, each further one twice as long."""
    if recent_crashes <= 0:
        return 0.0
    return min(config.restart_backoff_s * 2 ** (recent_crashes - 1), config.restart_backoff_max_s)


def failed_delay(failures: int, config: Config) -> float:
    """A failed slot's wait before it tries again: doubling per failure, capped (Kubernetes' way)."""
    return min(config.restart_failed_backoff_s * 2 ** (max(failures, 1) - 1),
               config.restart_failed_backoff_max_s)


class SlotLifecycle:
    def __init__(self, index: int, config: Config, now: float, generation: int = 0):
        self.index = index
        self.config = config
        self.phase = Phase.WAITING
        self.generation = generation
        self.current: Incarnation | None = None
        self.successor: Incarnation | None = None
        self.retiring: list[Incarnation] = []
        self.recycle: Recycle | None = None
        self.respawn_at = now  # no new worker before this time (restart or successor backoff)
        self.crashes: collections.deque[float] = collections.deque()
        self.failures = 0      # failed periods in a row; reset when a worker becomes ready
        self.retry_at = 0.0
        self.failed_reason = ""
        self.restarts = 0
        self.recycles = 0
        self.last_reason = ""
        self.spare: Spare | None = None
        self.spares = 0        # spares started: the next one's number
        self.spare_at = now    # no spare starts before this time (after one died: a backoff)
        self.spare_deaths: collections.deque[float] = collections.deque()

    # --- queries ---------------------------------------------------------------------------

    @property
    def max_live(self) -> int:
        return 1 if self.config.recycle_overlap == "never" else 2

    def workers(self) -> list[Incarnation]:
        return [w for w in (self.current, self.successor, *self.retiring) if w is not None]

    def find(self, generation: int) -> Incarnation | None:
        return next((w for w in self.workers() if w.generation == generation), None)

    @property
    def recycling(self) -> bool:
        """A recycle has started and its replacement is not serving yet."""
        return self.recycle is not None and self.recycle.started_at is not None

    def next_due(self, now: float) -> float | None:
        """When, after `now`, `tick` has something to do by the clock alone (start timeouts aside)."""
        due = []
        if self.phase is Phase.WAITING or self.phase is Phase.RECYCLE_WANTED:
            due.append(self.respawn_at)
        elif self.phase is Phase.FAILED:
            due.append(self.retry_at)
        if self.config.spare_workers and self.spare is None:
            due.append(self.spare_at)
        due = [t for t in due if t > now]
        return min(due) if due else None

    def wants_spare(self, now: float) -> bool:
        """Whether a spare should start now: spares are on, none lives, its backoff is over, and the
        slot serves with nothing starting (so no start shares the CPU with a spare's imports)."""
        current = self.current
        return (self.config.spare_workers and self.spare is None and now >= self.spare_at
                and self.phase is not Phase.STOPPED
                and current is not None and current.state is WorkerState.READY
                and not any(w.state in (WorkerState.SPAWNING, WorkerState.LOADING) for w in self.workers()))

    # --- events ----------------------------------------------------------------------------

    def spawned(self, generation: int, pid: int) -> list[Action]:
        worker = self.find(generation)
        if worker is None or worker.pid is not None:
            return []
        worker.pid = pid
        if worker.state is not WorkerState.SPAWNING:  # its pid came after it was told to stop
            return [Log("worker_pid", {"worker": self.index, "gen": generation, "pid": pid,
                                           "state": worker.state.value})]
        return [Log("worker_state", {"worker": self.index, "gen": generation, "pid": pid, "old": "exited",
                                         "new": WorkerState.SPAWNING.value, "reason": worker.started_for})]

    def hello(self, generation: int, now: float) -> list[Action]:
        worker = self.find(generation)
        if worker is None or worker.state is not WorkerState.SPAWNING:
            return []
        return self._set(worker, WorkerState.LOADING, "hello", now)

    def ready(self, generation: int, now: float, load_s: float = 0.0) -> list[Action]:
        worker = self.find(generation)
        if worker is None or worker.state not in STARTING:
            return []
        acts = self._set(worker, WorkerState.READY, "loaded", now, load_s=load_s)
        if worker is self.successor:
            acts += self._retire(self.current, f"replaced by gen {generation}", now)
            self.current, self.successor = worker, None
        if worker is not self.current:
            return acts
        worker.accepting = True
        acts.append(Accept(generation, True))
        if self.recycle is not None and self.recycle.started_at is not None:
            r, self.recycle = self.recycle, None
            self.recycles += 1
            acts.append(Log("recycle_done", {"worker": self.index, "gen": generation, "reason": r.reason,
                                                 "overlap": r.overlap, "waited_s": r.started_at - r.since,
                                                 "took_s": now - r.started_at}))
        if self.failures:
            acts.append(Log("slot_recovered", {"worker": self.index, "gen": generation,
                                                   "after_failures": self.failures}))
            self.failures, self.failed_reason = 0, ""
            self.crashes.clear()
        if self.phase is not Phase.STOPPED:
            self.phase = Phase.RECYCLE_WANTED if self.recycle else Phase.SERVING
        return acts + [Save()]

    def exited(self, generation: int, code: int, now: float) -> list[Action]:
        worker = self.find(generation)
        if worker is None:
            return []
        expected = worker.state is WorkerState.STOPPING
        how = describe(code)
        acts = self._set(worker, WorkerState.EXITED, how if expected else f"crashed ({how})", now)
        worker.accepting = False
        if not expected:
            acts.append(Count("worker_crashes"))
        if worker in self.retiring:
            self.retiring.remove(worker)  # it was leaving anyway: its crash changes nothing else
        elif worker is self.successor:
            self.successor = None
            if not expected:
                acts += self._successor_failed(code, how, now)
        elif worker is self.current:
            self.current = None
            if not expected:
                acts += self._current_failed(code, how, now)
        return acts

    def heartbeat_missed(self, generation: int, silent_s: float) -> list[Action]:
        worker = self.find(generation)
        if worker is None or worker.state not in (WorkerState.READY, WorkerState.DRAINING):
            return []  # a loading worker does not heartbeat yet; a stopping one escalates
        return self._kill(worker, f"no heartbeat for {silent_s:.1f}s")

    def hang(self, generation: int, stalled_s: float) -> list[Action]:
        worker = self.find(generation)
        if worker is None or worker.state is WorkerState.EXITED:
            return []
        return self._kill(worker, f"no request answered for {stalled_s:.1f}s")

    def verdict(self, generation: int, verdict: Verdict, now: float, fields: dict | None = None) -> list[Action]:
        """The recycle policy's verdict on a worker's latest telemetry."""
        worker = self.current
        if (worker is None or worker.generation != generation or worker.state is not WorkerState.READY
                or self.phase is Phase.STOPPED):
            return []
        r = self.recycle
        if r is None:
            return self._want_recycle(verdict, wait_idle=not verdict.hard, now=now, fields=fields)
        if not verdict.hard or r.hard:
            return []
        # a hard verdict during a soft recycle: escalate, the worker takes nothing more
        acts = [Log("recycle_escalated", {"worker": self.index, "gen": generation, "reason": verdict.reason,
                                              "was": r.reason, "value": verdict.value,
                                              "threshold": verdict.threshold}, logging.WARNING),
                Count(f"recycle_{verdict.reason}")]
        r.reason, r.hard, r.wait_idle = verdict.reason, True, False
        if self.successor is not None:  # it loads already: the old worker drains now
            acts += self._retire(worker, f"recycle: {verdict.reason}", now)
            self.current, self.successor = self.successor, None
            self.phase = Phase.STARTING
        else:
            acts += self._refuse(worker)
        return acts

    def operator_recycle(self, reason: str, now: float) -> list[Action]:
        """An operator's (or SIGHUP's) recycle; no actions when the slot cannot recycle now."""
        worker = self.current
        if (worker is None or worker.state is not WorkerState.READY or self.recycle is not None
                or self.phase is Phase.STOPPED):
            return []
        return self._want_recycle(Verdict(reason, hard=False, value=1, threshold=1),
                                  wait_idle=False, now=now)

    def shutdown(self, now: float) -> list[Action]:
        """Start nothing more; a successor still loading is told to stop. A wanted recycle stays
        on record but never starts (a hard one's worker stays without traffic)."""
        self.phase = Phase.STOPPED
        acts = self._stop_spare("shutdown", now)
        if self.successor is not None and self.successor.state is not WorkerState.STOPPING:
            acts += self._stop(self.successor, "shutdown", now)
        return acts

    def stop_all(self, now: float) -> list[Action]:
        """The end of a shutdown: every worker not yet stopping is asked to exit."""
        acts = self._stop_spare("shutdown", now)
        for worker in self.workers():
            if worker.state is not WorkerState.STOPPING:
                acts += self._refuse(worker) + self._stop(worker, "shutdown", now)
        return acts

    def tick(self, now: float, busy: Collection[int], room: Callable[[], bool],
             turn: bool) -> list[Action]:
        """What the clock makes due. `busy`: generations with requests in flight; `room()`: whether
        a second copy of the model fits beside the current one now; `turn`: whether another slot's
        recycle may start (`max_concurrent_recycles`)."""
        acts = []
        for worker in self.workers():
            if (worker.state in STARTING and not worker.killed
                    and now - worker.since > self.config.start_timeout_s):
                acts += self._kill(worker, "start timeout")
        for worker in self.retiring:
            if worker.state is WorkerState.DRAINING and worker.generation not in busy:
                acts += self._stop(worker, "drained", now)
        if self.phase is Phase.WAITING and now >= self.respawn_at and not self.retiring:
            acts += self._start_current(self.last_reason or "start", now)
        elif self.phase is Phase.FAILED and now >= self.retry_at and not self.retiring:
            acts.append(Log("slot_retry", {"worker": self.index, "failures": self.failures,
                                               "reason": self.failed_reason}))
            acts += self._start_current(f"retry after: {self.failed_reason}", now)
        elif self.phase is Phase.RECYCLE_WANTED:
            acts += self._start_recycle(now, busy, room, turn)
        return acts + self._keep_spare(now)

    # --- the spare's events -----------------------------------------------------------------

    def spare_spawned(self, number: int, pid: int) -> list[Action]:
        spare = self.spare
        if spare is None or spare.number != number or spare.pid is not None:
            return []
        spare.pid = pid
        return [Log("spare_state", {"worker": self.index, "spare": number, "pid": pid,
                                        "new": SpareState.STARTING.value})]

    def spare_hello(self, number: int, now: float) -> list[Action]:
        """The spare imported everything and connected: it can be told to load."""
        spare = self.spare
        if spare is None or spare.number != number or spare.state is not SpareState.STARTING:
            return []
        return self._set_spare(spare, SpareState.WAITING, "imported", now, import_s=now - spare.since)

    def spare_exited(self, number: int, code: int, now: float) -> list[Action]:
        """A spare ended. Never a crash of the slot: the next spare starts after a backoff of its own."""
        spare = self.spare
        if spare is None or spare.number != number:
            return []
        self.spare = None
        how = describe(code)
        if spare.state is SpareState.STOPPING:
            return [Log("spare_state", {"worker": self.index, "spare": number, "pid": spare.pid,
                                            "old": spare.state.value, "new": "exited", "reason": how})]
        n = self._record(self.spare_deaths, now)
        if is_permanent(code) or n >= self.config.restart_intensity:  # not worth a start every backoff
            delay = failed_delay(n, self.config)
        else:
            delay = restart_delay(n, self.config)
        self.spare_at = now + delay
        return [Log("spare_exited", {"worker": self.index, "spare": number, "pid": spare.pid,
                                         "state": spare.state.value, "reason": how, "backoff_s": delay,
                                         "deaths": len(self.spare_deaths)}, logging.WARNING),
                Count("spare_deaths")]

    # --- transitions -----------------------------------------------------------------------

    def _want_recycle(self, verdict: Verdict, wait_idle: bool, now: float,
                      fields: dict | None = None) -> list[Action]:
        worker = self.current
        self.recycle = Recycle(verdict.reason, verdict.hard, wait_idle and not verdict.hard, now)
        self.phase = Phase.RECYCLE_WANTED
        acts = [Log("recycle_wanted", dict(worker=self.index, gen=worker.generation,
                                           reason=verdict.reason, hard=verdict.hard,
                                           value=verdict.value, threshold=verdict.threshold,
                                           **(fields or {}))),
                Count(f"recycle_{verdict.reason}")]
        if verdict.hard:
            acts += self._refuse(worker)
        return acts

    def _start_recycle(self, now: float, busy: Collection[int], room: Callable[[], bool],
                       turn: bool) -> list[Action]:
        r, worker = self.recycle, self.current
        if self.retiring or now < self.respawn_at or not (turn or r.hard):
            return []
        if (r.wait_idle and worker.generation in busy
                and now - r.since < self.config.recycle_soft_wait_s):
            return []
        r.started_at, r.overlap = now, self.max_live > 1 and room()
        self.last_reason = f"recycle: {r.reason}"
        acts = [Log("recycle", {"worker": self.index, "gen": worker.generation, "reason": r.reason,
                                    "hard": r.hard, "overlap": r.overlap}),
                RecycleStarted(r.reason)]
        if r.overlap and not r.hard:  # the old worker serves until this one is ready
            self.successor, spawn = self._new_worker(now, self.last_reason)
            self.phase = Phase.OVERLAPPING
            return acts + spawn
        acts += self._retire(worker, self.last_reason, now)
        self.current = None
        if r.overlap:
            return acts + self._start_current(self.last_reason, now)
        self.phase, self.respawn_at = Phase.WAITING, now  # starts once the old one has exited
        return acts

    def _successor_failed(self, code: int, how: str, now: float) -> list[Action]:
        """A successor that cannot start postpones its recycle; the old worker goes on serving."""
        r = self.recycle
        n = self._record_crash(now)
        if r is None:
            return []
        r.started_at, r.failed_starts = None, r.failed_starts + 1
        if is_permanent(code) or n >= self.config.restart_intensity:
            delay = failed_delay(r.failed_starts, self.config)
        else:
            delay = restart_delay(n, self.config)
        self.respawn_at = now + delay
        self.phase = Phase.RECYCLE_WANTED
        self.last_reason = f"successor crashed ({how})"
        return [Log("recycle_postponed", {"worker": self.index, "reason": self.last_reason,
                                              "backoff_s": delay, "failed_starts": r.failed_starts},
                    logging.WARNING), Save()]

    def _current_failed(self, code: int, how: str, now: float) -> list[Action]:
        reason = f"crashed ({how})"
        self.last_reason = reason
        n = self._record_crash(now)
        if self.successor is not None and self.phase is not Phase.STOPPED:
            # the successor already loads: it takes over, no third worker is started
            self.current, self.successor = self.successor, None
            self.phase = Phase.STARTING
            return [Log("worker_restart", {"worker": self.index, "reason": reason, "backoff_s": 0.0,
                                               "crashes": n, "successor": self.current.generation},
                        logging.WARNING), Save()]
        self.recycle = None  # the worker that follows is fresh anyway
        if self.phase is Phase.STOPPED:
            return []
        if is_permanent(code):
            return self._fail(f"{how}: restarting cannot help", now)
        if self.failures or n >= self.config.restart_intensity:
            return self._fail(reason, now, crashes=n)
        self.restarts += 1
        delay = restart_delay(n, self.config)
        self.respawn_at, self.phase = now + delay, Phase.WAITING
        return [Log("worker_restart", {"worker": self.index, "reason": reason, "backoff_s": delay,
                                           "crashes": n}, logging.WARNING), Save()]

    def _fail(self, reason: str, now: float, **fields: object) -> list[Action]:
        self.failures += 1
        delay = failed_delay(self.failures, self.config)
        self.phase, self.retry_at, self.failed_reason = Phase.FAILED, now + delay, reason
        self.last_reason = reason
        return [Log("slot_failed", dict(worker=self.index, reason=reason, retry_in_s=delay,
                                        failures=self.failures, period_s=self.config.restart_period_s,
                                        **fields), logging.ERROR), Save()]

    def _record_crash(self, now: float) -> int:
        return self._record(self.crashes, now)

    def _record(self, times: collections.deque, now: float) -> int:
        """Add `now` to `times`: how many fall within the last `restart_period_s`."""
        times.append(now)
        while times and times[0] < now - self.config.restart_period_s:
            times.popleft()
        return len(times)

    def _start_current(self, reason: str, now: float) -> list[Action]:
        self.current, acts = self._new_worker(now, reason)
        self.phase = Phase.STARTING
        return acts

    def _new_worker(self, now: float, reason: str) -> tuple[Incarnation, list[Action]]:
        """The next incarnation: the waiting spare told to load, or else a cold process."""
        self.generation += 1
        worker = Incarnation(self.generation, WorkerState.SPAWNING, now, started_for=reason)
        spare = self.spare
        if spare is None or spare.state is not SpareState.WAITING or spare.killed:
            return worker, [Spawn(worker)]  # its state is logged once `spawned` gives its pid
        self.spare, worker.pid = None, spare.pid
        return worker, [LoadSpare(spare.number, worker), Count("spares_used"),
                        Log("worker_state", {"worker": self.index, "gen": worker.generation, "pid": spare.pid,
                                             "old": "spare", "new": WorkerState.SPAWNING.value,
                                             "reason": reason, "spare": spare.number})]

    def _keep_spare(self, now: float) -> list[Action]:
        """Start a spare when one is wanted; kill one that overstays the start timeout."""
        spare = self.spare
        if (spare is not None and spare.state is SpareState.STARTING and not spare.killed
                and now - spare.since > self.config.start_timeout_s):
            spare.killed = True
            return [KillSpare(spare.number, "start timeout")]
        if not self.wants_spare(now):
            return []
        self.spares += 1
        self.spare = Spare(self.spares, SpareState.STARTING, now)
        return [SpawnSpare(self.spares)]

    def _stop_spare(self, reason: str, now: float) -> list[Action]:
        spare = self.spare
        if spare is None or spare.state is SpareState.STOPPING:
            return []
        return [StopSpare(spare.number, reason), *self._set_spare(spare, SpareState.STOPPING, reason, now)]

    def _set_spare(self, spare: Spare, state: SpareState, reason: str, now: float,
                   **fields: object) -> list[Action]:
        log = Log("spare_state", dict(worker=self.index, spare=spare.number, pid=spare.pid,
                                      old=spare.state.value, new=state.value, reason=reason, **fields))
        spare.state, spare.since = state, now
        return [log]

    def _retire(self, worker: Incarnation, reason: str, now: float) -> list[Action]:
        self.retiring.append(worker)
        return self._refuse(worker) + self._set(worker, WorkerState.DRAINING, reason, now)

    def _refuse(self, worker: Incarnation) -> list[Action]:
        if not worker.accepting:
            return []
        worker.accepting = False
        return [Accept(worker.generation, False)]

    def _stop(self, worker: Incarnation, reason: str, now: float) -> list[Action]:
        return [StopWorker(worker.generation, reason), *self._set(worker, WorkerState.STOPPING, reason, now)]

    def _kill(self, worker: Incarnation, reason: str) -> list[Action]:
        if worker.killed:
            return []  # its exit follows
        worker.killed = True
        return self._refuse(worker) + [KillWorker(worker.generation, reason)]

    def _set(self, worker: Incarnation, state: WorkerState, reason: str, now: float,
             **fields: object) -> list[Action]:
        log = Log("worker_state", dict(worker=self.index, gen=worker.generation, pid=worker.pid,
                                       old=worker.state.value, new=state.value, reason=reason, **fields))
        worker.state, worker.since = state, now
        return [log]
