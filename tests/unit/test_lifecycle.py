"""The slot lifecycle in-process, with a fake clock and no process: a table per transition, then a
stateful property test that drives random interleavings of every event over one to three slots."""

import collections
import dataclasses

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from qvl.protocol.exits import WorkerExit
from qvl.supervisor.config import Config
from qvl.supervisor.lifecycle import (
    Accept,
    Count,
    KillSpare,
    KillWorker,
    LoadSpare,
    Log,
    Phase,
    SlotLifecycle,
    Spawn,
    SpawnSpare,
    SpareState,
    StopSpare,
    StopWorker,
    WorkerState,
    failed_delay,
)
from qvl.supervisor.policy import Verdict

CONFIG = Config(restart_backoff_s=1.0, restart_backoff_max_s=30.0, restart_intensity=3,
                restart_period_s=60.0, start_timeout_s=100.0, recycle_soft_wait_s=30.0,
                restart_failed_backoff_s=10.0, restart_failed_backoff_max_s=300.0,
                spare_workers=False)  # the tables without spares: today's behaviour, unchanged
SPARES = dataclasses.replace(CONFIG, spare_workers=True)
SOFT = Verdict("fragmentation", hard=False, value=0.5, threshold=0.4)
HARD = Verdict("out_of_memory", hard=True, value=1, threshold=1)
CRASH, KILLED = 7, -9


def names(actions) -> list[str]:
    """Actions as short words a table can list: `spawn 2`, `accept 1 off`, `log slot_failed`."""
    out = []
    for a in actions:
        if isinstance(a, Spawn):
            out.append(f"spawn {a.worker.generation}")
        elif isinstance(a, Accept):
            out.append(f"accept {a.generation} {'on' if a.on else 'off'}")
        elif isinstance(a, StopWorker):
            out.append(f"stop {a.generation}")
        elif isinstance(a, KillWorker):
            out.append(f"kill {a.generation}")
        elif isinstance(a, SpawnSpare):
            out.append(f"spawn spare {a.number}")
        elif isinstance(a, LoadSpare):
            out.append(f"load spare {a.number} as {a.worker.generation}")
        elif isinstance(a, StopSpare):
            out.append(f"stop spare {a.number}")
        elif isinstance(a, KillSpare):
            out.append(f"kill spare {a.number}")
        elif isinstance(a, Log) and a.name not in ("worker_state", "spare_state"):
            out.append(f"log {a.name}")
    return out


def tick(life, now, busy=(), room=True, turn=True):
    acts = life.tick(now, set(busy), lambda: room, turn)
    for a in acts:
        if isinstance(a, Spawn):
            life.spawned(a.worker.generation, pid=1000 + a.worker.generation)
        elif isinstance(a, SpawnSpare):
            life.spare_spawned(a.number, pid=2000 + a.number)
    return acts


def start(life, now=0.0):
    """Bring the slot's current (or successor) worker from spawn to ready."""
    gen = life.generation
    life.hello(gen, now)
    return life.ready(gen, now)


# --- the slot in each phase, built through events only ------------------------------------------

def waiting(config=CONFIG):
    return SlotLifecycle(0, config, now=0.0)


def starting(config=CONFIG):
    life = waiting(config)
    tick(life, 0.0)
    return life


def serving(config=CONFIG):
    life = starting(config)
    start(life)
    return life


def recycle_wanted(verdict=SOFT, config=CONFIG):
    life = serving(config)
    life.verdict(1, verdict, 1.0)
    return life


def overlapping(config=CONFIG):
    life = serving(config)
    life.operator_recycle("operator", 1.0)
    tick(life, 1.0, room=True)
    return life


def retiring_without_overlap(config=CONFIG):
    life = serving(config)
    life.operator_recycle("operator", 1.0)
    tick(life, 1.0, room=False)
    return life


def failed(config=CONFIG):
    life = starting(config)
    life.exited(1, WorkerExit.LOAD_FAILED, 1.0)
    return life


# Each row: the phase to start from, the event, the actions it must give (in order, among others
# unlisted), actions it must not give, and the phase after.
TRANSITIONS = {
    "waiting: the first tick spawns": (
        waiting, lambda l: tick(l, 0.0), ["spawn 1"], [], Phase.STARTING),
    "starting: hello is only logged": (
        starting, lambda l: l.hello(1, 0.5), [], ["accept 1 on"], Phase.STARTING),
    "starting: ready takes traffic": (
        starting, lambda l: start(l), ["accept 1 on"], [], Phase.SERVING),
    "starting: a load failure fails the slot at once, no restart": (
        starting, lambda l: l.exited(1, WorkerExit.LOAD_FAILED, 1.0), ["log slot_failed"],
        ["log worker_restart"], Phase.FAILED),
    "starting: a start timeout kills": (
        starting, lambda l: tick(l, 101.0), ["kill 1"], ["spawn 2"], Phase.STARTING),
    "serving: a crash restarts after the backoff": (
        serving, lambda l: l.exited(1, CRASH, 5.0), ["log worker_restart"], ["log slot_failed"],
        Phase.WAITING),
    "serving: a soft verdict keeps traffic": (
        serving, lambda l: l.verdict(1, SOFT, 1.0), ["log recycle_wanted"], ["accept 1 off"],
        Phase.RECYCLE_WANTED),
    "serving: a hard verdict stops dispatch at once": (
        serving, lambda l: l.verdict(1, HARD, 1.0), ["log recycle_wanted", "accept 1 off"], [],
        Phase.RECYCLE_WANTED),
    "serving: missed heartbeats kill and stop dispatch": (
        serving, lambda l: l.heartbeat_missed(1, 12.0), ["accept 1 off", "kill 1"], [], Phase.SERVING),
    "serving: a hung request kills": (
        serving, lambda l: l.hang(1, 700.0), ["accept 1 off", "kill 1"], [], Phase.SERVING),
    "serving: an operator recycle is wanted": (
        serving, lambda l: l.operator_recycle("operator", 1.0), ["log recycle_wanted"], ["accept 1 off"],
        Phase.RECYCLE_WANTED),
    "serving: shutdown starts nothing more": (
        serving, lambda l: l.shutdown(1.0), [], ["stop 1"], Phase.STOPPED),
    "recycle wanted: busy worker, soft reason, not waited long: nothing yet": (
        recycle_wanted, lambda l: tick(l, 10.0, busy={1}), [], ["spawn 2"], Phase.RECYCLE_WANTED),
    "recycle wanted: busy past the soft wait: starts anyway": (
        recycle_wanted, lambda l: tick(l, 40.0, busy={1}), ["log recycle", "spawn 2"], [],
        Phase.OVERLAPPING),
    "recycle wanted: not its turn, soft: waits": (
        recycle_wanted, lambda l: tick(l, 40.0, turn=False), [], ["spawn 2"], Phase.RECYCLE_WANTED),
    "recycle wanted: not its turn, hard: starts, old one drains, new one beside it": (
        lambda: recycle_wanted(HARD), lambda l: tick(l, 2.0, busy={1}, turn=False),
        ["log recycle", "spawn 2"], [], Phase.STARTING),
    "recycle wanted: no room: the old one drains first": (
        recycle_wanted, lambda l: tick(l, 2.0, room=False), ["log recycle"], ["spawn 2"], Phase.WAITING),
    "recycle wanted (soft): a hard verdict escalates": (
        recycle_wanted, lambda l: l.verdict(1, HARD, 2.0), ["log recycle_escalated", "accept 1 off"], [],
        Phase.RECYCLE_WANTED),
    "recycle wanted: a second soft verdict changes nothing": (
        recycle_wanted, lambda l: l.verdict(1, SOFT, 2.0), [], ["log recycle_wanted"], Phase.RECYCLE_WANTED),
    "overlapping: the successor's ready replaces the old worker": (
        overlapping, lambda l: start(l, 3.0), ["accept 1 off", "accept 2 on", "log recycle_done"], [],
        Phase.SERVING),
    "overlapping: a hard verdict retires the old worker at once": (
        overlapping, lambda l: l.verdict(1, HARD, 2.0), ["log recycle_escalated", "accept 1 off"], [],
        Phase.STARTING),
    "overlapping: a crashed successor postpones, the old worker serves on": (
        overlapping, lambda l: l.exited(2, CRASH, 2.0), ["log recycle_postponed"],
        ["accept 1 off", "log slot_failed"], Phase.RECYCLE_WANTED),
    "overlapping: a successor that cannot load postpones, never fails the slot": (
        overlapping, lambda l: l.exited(2, WorkerExit.LOAD_FAILED, 2.0), ["log recycle_postponed"],
        ["log slot_failed"], Phase.RECYCLE_WANTED),
    # fault a: the old worker crashes while its successor loads
    "overlapping: the old worker crashes: the loading successor takes over, no third worker": (
        overlapping, lambda l: l.exited(1, KILLED, 2.0), ["log worker_restart"], ["spawn 3"],
        Phase.STARTING),
    "overlapping: shutdown stops the successor": (
        overlapping, lambda l: l.shutdown(2.0), ["stop 2"], ["stop 1"], Phase.STOPPED),
    "retiring: drained (idle) is told to stop": (
        retiring_without_overlap, lambda l: tick(l, 2.0), ["stop 1"], ["spawn 2"], Phase.WAITING),
    "retiring: the new worker starts once the old one exited": (
        retiring_without_overlap, lambda l: (tick(l, 2.0), l.exited(1, 0, 3.0), tick(l, 3.0))[2],
        ["spawn 2"], [], Phase.STARTING),
    "failed: before the retry time nothing starts": (
        failed, lambda l: tick(l, 10.0), [], ["spawn 2"], Phase.FAILED),
    "failed: at the retry time it starts again": (
        failed, lambda l: tick(l, 11.0), ["log slot_retry", "spawn 2"], [], Phase.STARTING),
    "failed: the retried worker's ready serves again": (
        failed, lambda l: (tick(l, 11.0), start(l, 12.0))[1], ["accept 2 on", "log slot_recovered"], [],
        Phase.SERVING),
    "failed: an operator recycle is refused": (
        failed, lambda l: l.operator_recycle("operator", 2.0), [], ["log recycle_wanted"], Phase.FAILED),
}


@pytest.mark.parametrize("name", TRANSITIONS)
def test_transition(name):
    build, event, given, not_given, phase = TRANSITIONS[name]
    life = build()
    got = names(event(life))
    it = iter(got)
    assert all(any(g == want for g in it) for want in given), got  # in this order
    assert not set(not_given) & set(got), got
    assert life.phase is phase


def test_fault_a_successor_ready_after_the_old_worker_crashed_serves_and_spawns_nothing_more():
    life = overlapping()
    life.exited(1, KILLED, 2.0)
    assert names(tick(life, 100.0)) == []  # backoff long over: still no third worker
    acts = names(start(life, 101.0))
    assert acts[:1] == ["accept 2 on"] and "log recycle_done" in acts
    assert life.phase is Phase.SERVING and life.current.generation == 2 and not life.retiring


def test_crashes_past_the_intensity_fail_the_slot_then_it_retries_with_doubling_backoff():
    life = serving()
    now = 1.0
    for crash in range(3):
        life.exited(life.current.generation, CRASH, now)
        if crash < 2:
            assert life.phase is Phase.WAITING and life.respawn_at == now + 2.0 ** crash
            tick(life, life.respawn_at)
            now = life.respawn_at
            start(life, now)
    assert life.phase is Phase.FAILED and life.retry_at == now + 10.0
    for failures, wait in ((1, 10.0), (2, 20.0), (3, 40.0)):
        assert life.failures == failures and life.retry_at - now == wait
        now = life.retry_at
        assert "spawn" in " ".join(names(tick(life, now)))
        life.exited(life.current.generation, CRASH, now)  # crashes before ready: failed again
    assert life.phase is Phase.FAILED and life.retry_at - now == 80.0
    now = life.retry_at
    tick(life, now)
    start(life, now)
    assert life.phase is Phase.SERVING and life.failures == 0 and not life.crashes


def test_a_failed_slot_never_waits_more_than_five_minutes():
    assert max(failed_delay(n, CONFIG) for n in range(1, 40)) == 300.0


def test_successors_that_never_start_postpone_with_capped_backoff_and_never_fail_the_slot():
    life = overlapping()
    now = 1.0
    for attempt in range(8):
        life.exited(life.successor.generation, CRASH, now)
        assert life.phase is Phase.RECYCLE_WANTED and life.current.generation == 1
        assert life.respawn_at - now <= 300.0
        now = life.respawn_at
        tick(life, now, room=True)
        assert life.phase is Phase.OVERLAPPING
    assert life.failures == 0


def test_a_permanent_exit_names_its_reason():
    life = failed()
    assert "load_failed" in life.failed_reason and life.retry_at == 11.0


def test_stop_all_asks_every_worker_to_exit_once():
    life = overlapping()
    life.shutdown(2.0)
    assert names(life.stop_all(3.0)) == ["accept 1 off", "stop 1"]
    assert life.stop_all(4.0) == []


# --- the spare ---------------------------------------------------------------------------------

def spare_starting():
    life = serving(SPARES)
    tick(life, 0.0)
    return life


def spare_waiting():
    life = spare_starting()
    life.spare_hello(1, 0.0)
    return life


def spare_died():
    life = spare_waiting()
    life.spare_exited(1, KILLED, 2.0)
    return life


def recycle_with_spare(room):
    def event(life):
        life.operator_recycle("operator", 1.0)
        acts = tick(life, 1.0, room=room)
        if not room:  # the old worker drains and exits first
            tick(life, 2.0)
            life.exited(1, 0, 3.0)
            acts = tick(life, 3.0)
        return acts
    return event


SPARE_TRANSITIONS = {
    "spares on, starting: no spare while the first worker imports": (
        lambda: starting(SPARES), lambda l: tick(l, 0.5), [], ["spawn spare 1"], Phase.STARTING),
    "spares on, starting: nor while it loads": (
        lambda: starting(SPARES), lambda l: (l.hello(1, 0.5), tick(l, 0.6))[1], [], ["spawn spare 1"],
        Phase.STARTING),
    "spares on, serving: the tick starts a spare": (
        lambda: serving(SPARES), lambda l: tick(l, 0.0), ["spawn spare 1"], [], Phase.SERVING),
    "spare starting: a second tick starts no second spare": (
        spare_starting, lambda l: tick(l, 1.0), [], ["spawn spare 2"], Phase.SERVING),
    "spare starting: its hello changes nothing but the spare": (
        spare_starting, lambda l: l.spare_hello(1, 1.0), [], ["accept 1 off"], Phase.SERVING),
    "spare waiting: a crash loads it once the backoff is over, no cold start": (
        spare_waiting, lambda l: (l.exited(1, CRASH, 5.0), tick(l, 6.0))[1], ["load spare 1 as 2"],
        ["spawn 2", "spawn spare 2"], Phase.STARTING),
    "spare waiting: a hang kill's exit loads it too": (
        spare_waiting, lambda l: (l.hang(1, 700.0), l.exited(1, KILLED, 5.0), tick(l, 6.0))[2],
        ["load spare 1 as 2"], ["spawn 2"], Phase.STARTING),
    "spare still importing: a crash starts cold, the spare goes on importing": (
        spare_starting, lambda l: (l.exited(1, CRASH, 5.0), tick(l, 6.0))[1], ["spawn 2"],
        ["load spare 1 as 2", "kill spare 1"], Phase.STARTING),
    "spare waiting: a recycle with overlap loads it as the successor": (
        spare_waiting, recycle_with_spare(room=True), ["log recycle", "load spare 1 as 2"], ["spawn 2"],
        Phase.OVERLAPPING),
    "spare waiting: a recycle without overlap loads it once the old worker exited": (
        spare_waiting, recycle_with_spare(room=False), ["load spare 1 as 2"], ["spawn 2"], Phase.STARTING),
    "spare waiting: the loaded spare cannot load the model: the slot fails as after a cold start": (
        spare_waiting, lambda l: (l.exited(1, CRASH, 5.0), tick(l, 6.0), l.exited(2, WorkerExit.LOAD_FAILED, 7.0))[2],
        ["log slot_failed"], [], Phase.FAILED),
    "spare waiting: its death is no crash of the slot": (
        spare_waiting, lambda l: l.spare_exited(1, KILLED, 2.0), ["log spare_exited"],
        ["log worker_restart", "log slot_failed", "accept 1 off", "kill 1"], Phase.SERVING),
    "spare died: none starts before its backoff": (
        spare_died, lambda l: tick(l, 2.5), [], ["spawn spare 2"], Phase.SERVING),
    "spare died: the next starts after its backoff": (
        spare_died, lambda l: tick(l, 3.0), ["spawn spare 2"], [], Phase.SERVING),
    "spare starting: the start timeout kills it, not the worker": (
        spare_starting, lambda l: tick(l, 101.0), ["kill spare 1"], ["kill 1"], Phase.SERVING),
    "spare waiting: shutdown stops it with the successor": (
        spare_waiting, lambda l: l.shutdown(2.0), ["stop spare 1"], ["stop 1"], Phase.STOPPED),
    "spares on, failed slot: no spare": (
        lambda: failed(SPARES), lambda l: tick(l, 5.0), [], ["spawn spare 1"], Phase.FAILED),
    "spares off, serving: no spare": (
        serving, lambda l: tick(l, 50.0), [], ["spawn spare 1"], Phase.SERVING),
}


@pytest.mark.parametrize("name", SPARE_TRANSITIONS)
def test_spare_transition(name):
    build, event, given, not_given, phase = SPARE_TRANSITIONS[name]
    life = build()
    got = names(event(life))
    it = iter(got)
    assert all(any(g == want for g in it) for want in given), got  # in this order
    assert not set(not_given) & set(got), got
    assert life.phase is phase


def test_a_used_spare_is_the_new_worker_and_a_new_spare_starts_once_it_serves():
    life = spare_waiting()
    life.exited(1, CRASH, 5.0)
    acts = tick(life, 6.0)
    assert life.current.generation == 2 and life.current.pid == 2001 and life.spare is None
    assert any(isinstance(a, Count) and a.key == "spares_used" for a in acts)
    assert names(tick(life, 6.1)) == []        # spawning: it connects anew as gen 2
    life.hello(2, 6.2)
    assert names(tick(life, 6.3)) == []        # loading
    assert "accept 2 on" in names(life.ready(2, 7.0))
    assert names(tick(life, 7.0)) == ["spawn spare 2"]
    assert life.spare.number == 2 and life.spare.state is SpareState.STARTING


def test_no_spare_starts_while_an_overlapping_successor_loads():
    life = spare_waiting()
    recycle_with_spare(room=True)(life)  # the spare is the successor; the old worker serves on
    life.hello(2, 1.5)
    assert life.current.state is WorkerState.READY and life.spare is None
    assert not any(n.startswith("spawn spare") for n in names(tick(life, 1.6, room=True)))
    life.ready(2, 2.0)
    assert any(n.startswith("spawn spare") for n in names(tick(life, 2.1, room=True)))


def test_a_spare_that_cannot_start_for_good_waits_as_a_failed_slot_does():
    life = spare_starting()
    life.spare_exited(life.spare.number, WorkerExit.BAD_SPEC, 1.0)
    assert life.spare_at - 1.0 == 10.0 and life.phase is Phase.SERVING and not life.crashes


def test_spare_deaths_back_off_doubling_capped_and_never_touch_the_slot():
    """Doubling from restart_backoff_s; from restart_intensity deaths in the period on, a spare that
    keeps dying waits as a failed slot does (from 10 s, capped at 300 s), not a start every 30 s."""
    life = serving(dataclasses.replace(SPARES, restart_period_s=10_000.0))
    tick(life, 0.0)
    now = 1.0
    for death, wait in enumerate([1.0, 2.0, 40.0, 80.0, 160.0, 300.0, 300.0]):
        acts = life.spare_exited(life.spare.number, CRASH, now)
        assert not any(isinstance(a, Count) and a.key == "worker_crashes" for a in acts)
        assert life.spare_at - now == wait
        now = life.spare_at
        assert names(tick(life, now)) == [f"spawn spare {death + 2}"]
    assert life.phase is Phase.SERVING and not life.crashes and life.restarts == 0 and not life.failures
    assert life.current.accepting


def test_a_spare_that_stops_on_shutdown_is_not_a_death():
    life = spare_waiting()
    life.shutdown(2.0)
    assert names(life.spare_exited(1, -15, 3.0)) == []
    assert life.spare is None and not life.spare_deaths
    assert names(tick(life, 100.0)) == []  # stopped: no spare, no worker


# --- random interleavings ----------------------------------------------------------------------

class Sim:
    """What the supervisor does with a slot's actions, with fake processes and requests."""

    def __init__(self, slots: int, config: Config):
        self.now = 0.0
        self.lives = [SlotLifecycle(i, config, 0.0) for i in range(slots)]
        self.procs: dict[tuple[int, int], str] = {}  # alive | stopping | killed
        self.accepting: set[tuple[int, int]] = set()
        self.inflight: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
        self.queue: list[int] = []
        self.answers: collections.Counter = collections.Counter()
        self.requests = 0
        self.stopped_all = False
        self.room = True  # whether a second copy of the model fits
        self.spares: dict[tuple[int, int], str] = {}  # spare processes: alive | stopping | killed
        self.spare_hellos: set[tuple[int, int]] = set()  # spares that finished importing

    def apply(self, i: int, actions) -> None:
        for a in actions:
            if isinstance(a, Spawn):
                self.procs[(i, a.worker.generation)] = "alive"
                self.apply(i, self.lives[i].spawned(a.worker.generation, pid=100 * i + a.worker.generation))
            elif isinstance(a, Accept):
                (self.accepting.add if a.on else self.accepting.discard)((i, a.generation))
            elif isinstance(a, StopWorker):
                self.procs[(i, a.generation)] = "stopping"
            elif isinstance(a, KillWorker):
                self.procs[(i, a.generation)] = "killed"
            elif isinstance(a, SpawnSpare):
                assert not [key for key in self.spares if key[0] == i], "a second spare"
                self.spares[(i, a.number)] = "alive"
                self.apply(i, self.lives[i].spare_spawned(a.number, pid=10_000 + 100 * i + a.number))
            elif isinstance(a, LoadSpare):  # the same process goes on as that generation
                key = (i, a.number)
                assert self.spares.pop(key) == "alive" and key in self.spare_hellos
                assert a.worker.state is WorkerState.SPAWNING and not a.worker.accepting
                self.procs[(i, a.worker.generation)] = "alive"
            elif isinstance(a, StopSpare):
                self.spares[(i, a.number)] = "stopping"
            elif isinstance(a, KillSpare):
                self.spares[(i, a.number)] = "killed"

    def event(self, i: int, actions) -> None:
        """Carry out an event's actions, then tick every slot, as one turn of the loop does."""
        self.apply(i, actions)
        self.tick()

    def exit(self, key: tuple[int, int], code: int) -> None:
        del self.procs[key]
        self.accepting.discard(key)
        self.queue.extend(self.inflight.pop(key, set()))  # retried, as the supervisor does
        self.event(key[0], self.lives[key[0]].exited(key[1], code, self.now))

    def tick(self) -> None:
        for i, life in enumerate(self.lives):
            turn = sum(x.recycling for x in self.lives) < 1
            busy = {g for (s, g), reqs in self.inflight.items() if s == i and reqs}
            self.apply(i, life.tick(self.now, busy, lambda: self.room, turn))


def pick(items, k):
    items = sorted(items)
    return items[k % len(items)] if items else None


class LifecycleMachine(RuleBasedStateMachine):
    @initialize(slots=st.integers(1, 3), overlap=st.sampled_from(["auto", "auto", "never"]),
                intensity=st.integers(1, 3), spares=st.booleans())
    def setup(self, slots, overlap, intensity, spares):
        config = dataclasses.replace(CONFIG, recycle_overlap=overlap, restart_intensity=intensity,
                                     spare_workers=spares)
        self.sim = Sim(slots, config)
        self.sim.tick()

    @rule(dt=st.sampled_from([0.1, 1.0, 5.0, 31.0, 120.0, 400.0]), room=st.sampled_from([True, True, False]))
    def advance(self, dt, room):
        sim = self.sim
        sim.now, sim.room = sim.now + dt, room
        due = [life.phase is Phase.FAILED and sim.now >= life.retry_at and not life.retiring
               for life in sim.lives]
        sim.tick()
        for was_due, life in zip(due, sim.lives):
            if was_due:  # a failed slot tries again once its backoff is over
                assert life.phase is Phase.STARTING, life.phase

    @rule(k=st.integers(0, 99))
    def hello(self, k):
        key = pick(self.sim.procs, k)
        if key:
            self.sim.event(key[0], self.sim.lives[key[0]].hello(key[1], self.sim.now))

    @rule(k=st.integers(0, 99))
    def spare_hello(self, k):
        key = pick(self.sim.spares, k)
        if key:
            self.say_spare_hello(key)

    def say_spare_hello(self, key):
        self.sim.spare_hellos.add(key)
        self.sim.event(key[0], self.sim.lives[key[0]].spare_hello(key[1], self.sim.now))

    @rule(k=st.integers(0, 99), code=st.sampled_from([0, 1, 4, 6, -9, -15]), rare=st.integers(0, 2))
    def spare_exits(self, k, code, rare):
        """A spare ends: the slot's workers, crash record, backoff and phase stay as they were."""
        sim = self.sim
        key = pick(sim.spares, k)
        if not key or (rare and sim.spares[key] == "alive"):
            return
        life = sim.lives[key[0]]
        before = (life.phase, list(life.crashes), life.failures, life.restarts, life.respawn_at,
                  life.retry_at, life.recycle, life.workers())
        acts = life.spare_exited(key[1], code, sim.now)
        assert not any(isinstance(a, Count) and a.key == "worker_crashes" for a in acts)
        assert not any(isinstance(a, (Spawn, KillWorker, StopWorker, Accept)) for a in acts)
        assert (life.phase, list(life.crashes), life.failures, life.restarts, life.respawn_at,
                life.retry_at, life.recycle, life.workers()) == before
        del sim.spares[key]
        sim.event(key[0], acts)

    @rule()
    def all_load(self):
        """Every worker still starting says hello and ready, as most do; every spare says hello."""
        for key in sorted(self.sim.spares):
            if key in self.sim.spares:  # an earlier hello's turn may have used it already
                self.say_spare_hello(key)
        for key in sorted(self.sim.procs):
            self.sim.event(key[0], self.sim.lives[key[0]].hello(key[1], self.sim.now))
            self.load(key)

    @rule(k=st.integers(0, 99))
    def ready(self, k):
        key = pick(self.sim.procs, k)
        if key is not None:
            self.load(key)

    def load(self, key):
        sim = self.sim
        life = sim.lives[key[0]]
        worker = life.find(key[1])
        will_serve = (worker is not None and worker.state in (WorkerState.SPAWNING, WorkerState.LOADING)
                      and worker in (life.current, life.successor) and sim.procs[key] == "alive")
        sim.event(key[0], life.ready(key[1], sim.now))
        if will_serve:  # a start that succeeds serves
            assert life.current is worker and key in sim.accepting
            assert life.phase in (Phase.SERVING, Phase.RECYCLE_WANTED, Phase.STOPPED)

    # Faults are drawn less often than progress, so that runs reach overlaps and recoveries.
    @rule(k=st.integers(0, 99), code=st.sampled_from([0, 1, 3, 4, 5, 7, -9, -15]), rare=st.integers(0, 2))
    def process_exits(self, k, code, rare):
        key = pick(self.sim.procs, k)
        if key and (rare == 0 or self.sim.procs[key] != "alive"):
            self.sim.exit(key, code)

    @rule(k=st.integers(0, 99), rare=st.integers(0, 3))
    def heartbeat_missed(self, k, rare):
        key = pick(self.sim.procs, k)
        if key and rare == 0:
            self.sim.event(key[0], self.sim.lives[key[0]].heartbeat_missed(key[1], 12.0))

    @rule(k=st.integers(0, 99), rare=st.integers(0, 3))
    def hang(self, k, rare):
        key = pick(self.sim.procs, k)
        if key and rare == 0:
            self.sim.event(key[0], self.sim.lives[key[0]].hang(key[1], 700.0))

    @rule(k=st.integers(0, 99), hard=st.booleans())
    def verdict(self, k, hard):
        key = pick(self.sim.procs, k)
        if key:
            verdict = HARD if hard else SOFT
            self.sim.event(key[0], self.sim.lives[key[0]].verdict(key[1], verdict, self.sim.now))

    @rule(k=st.integers(0, 2))
    def operator_recycle(self, k):
        i = k % len(self.sim.lives)
        self.sim.event(i, self.sim.lives[i].operator_recycle("operator", self.sim.now))

    @rule(n=st.integers(1, 4))
    def submit(self, n):
        for _ in range(n):
            self.sim.requests += 1
            self.sim.queue.append(self.sim.requests)

    @rule()
    def dispatch(self):
        sim = self.sim
        while sim.queue and sim.accepting:
            sim.inflight[pick(sim.accepting, len(sim.queue))].add(sim.queue.pop(0))

    @rule(k=st.integers(0, 99))
    def reply(self, k):
        key = pick([key for key, reqs in self.sim.inflight.items() if reqs], k)
        if key:
            request = pick(self.sim.inflight[key], k)
            self.sim.inflight[key].discard(request)
            self.sim.answers[request] += 1

    @rule(k=st.integers(0, 9))
    def shutdown(self, k):
        if k:
            return  # rarely: it ends everything else
        for i, life in enumerate(self.sim.lives):
            self.sim.event(i, life.shutdown(self.sim.now))

    @rule()
    def stop_all(self):
        if all(life.phase is Phase.STOPPED for life in self.sim.lives):
            self.sim.stopped_all = True
            for i, life in enumerate(self.sim.lives):
                self.sim.event(i, life.stop_all(self.sim.now))

    # --- after every step ---

    @invariant()
    def processes_match_the_lifecycle_and_stay_within_the_overlap_policy(self):
        for i, life in enumerate(self.sim.lives):
            live = {g for (s, g) in self.sim.procs if s == i}
            assert live == {w.generation for w in life.workers()}
            assert len(live) <= life.max_live, (life.phase, live)
            assert life.successor is None or life.phase in (Phase.OVERLAPPING, Phase.STOPPED)
            assert len({id(w) for w in life.workers()}) == len(life.workers())  # none held twice

    @invariant()
    def only_current_workers_take_traffic_and_a_healthy_one_always_does(self):
        for i, life in enumerate(self.sim.lives):
            current = life.current
            for (s, g) in self.sim.accepting:
                if s == i:
                    assert current is not None and current.generation == g
            healthy = (current is not None and current.state is WorkerState.READY and not current.killed
                       and not (life.recycle and life.recycle.hard) and not self.sim.stopped_all)
            if healthy:
                assert (i, current.generation) in self.sim.accepting, life.phase

    @invariant()
    def at_most_one_spare_per_slot_and_it_never_serves(self):
        sim = self.sim
        for i, life in enumerate(sim.lives):
            spares = {n for (s, n) in sim.spares if s == i}
            assert spares == ({life.spare.number} if life.spare else set())
            if life.spare is not None:
                assert life.config.spare_workers
                assert all(w.pid != life.spare.pid for w in life.workers())
        busy = {key for key, reqs in sim.inflight.items() if reqs}
        assert (sim.accepting | busy) <= set(sim.procs)  # traffic only to model processes, never a spare

    @invariant()
    def a_serving_slot_gets_its_spare_back_within_a_bounded_time(self):
        """After each turn no spare is wanted and missing; and one that is missing waits at most the
        longest backoff of a failed slot, however it was lost (used, died, killed)."""
        for life in self.sim.lives:
            assert not life.wants_spare(self.sim.now), (life.phase, life.spare_at, self.sim.now)
            if life.config.spare_workers and life.spare is None:
                assert life.spare_at - self.sim.now <= life.config.restart_failed_backoff_max_s

    @invariant()
    def a_failed_slot_has_a_capped_retry(self):
        for life in self.sim.lives:
            if life.phase is Phase.FAILED:
                assert 0 < life.retry_at - self.sim.now <= 300.0 or self.sim.now >= life.retry_at
                assert life.current is None and life.successor is None

    @invariant()
    def every_request_is_held_once_or_ended_once(self):
        sim = self.sim
        held = collections.Counter(sim.queue)
        for reqs in sim.inflight.values():
            held.update(reqs)
        assert all(n == 1 for n in sim.answers.values())
        assert all(n == 1 for n in held.values())
        assert not set(held) & set(sim.answers)
        assert len(held) + len(sim.answers) == sim.requests


EXAMPLES = 200


def test_random_event_orders_keep_every_invariant(record_property):
    """The stateful test: `EXAMPLES` random runs of up to 40 events over one to three slots, every
    invariant checked after each step. It counts the runs it made, so the record is a reading: the
    count goes into the test's report and the session's summary prints it (under xdist too)."""
    runs = collections.Counter()

    class Counted(LifecycleMachine):
        def __init__(self):
            super().__init__()
            runs["runs"] += 1

    run_state_machine_as_test(Counted, settings=settings(max_examples=EXAMPLES, stateful_step_count=40,
                                                         deadline=None))
    record_property("stateful_runs", runs["runs"])
    assert runs["runs"] >= EXAMPLES
