"""The schedule store (control/_schedules.py) and the rule schedules pass (tasks/schedule.py).

The store is driven with a fake wall clock; a hypothesis state machine
checks it against a model that computes ticks by brute force: each
schedule runs at most once per ``due()``, for its first missed tick, never
early, never for the same tick twice, and moves past now.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from croniter import croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fastworker import task
from fastworker.control._deadletters import DeadLetters, DeadLettersConfig
from fastworker.control._requests import answer
from fastworker.control._schedules import (
    MAX_RUNS_PER_TURN,
    Schedules,
    SchedulesConfig,
    ScheduleSpec,
    tick_task_id,
)
from fastworker.control._taskbook import TaskBook, TaskBookConfig
from fastworker.tasks.schedule import ScheduleError, check_schedule
from fastworker.wire import ScheduleAdd, ScheduleList, ScheduleRemove

T0 = 1_800_000_000.0  # a whole minute


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def spec(
    schedule_id: str = "s",
    cron: str | None = None,
    interval: float | None = None,
    payload: bytes = b"\x82\x80\xa0",
    source: str = "client",
) -> ScheduleSpec:
    wire = [schedule_id, "job", cron, interval, None, 2, 1, payload]
    return ScheduleSpec.from_wire(wire, source)


# -- the rule ----------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({}, ScheduleError, "give cron= or repeat_interval="),
        ({"cron": "* * * * *", "repeat_interval": 5}, ScheduleError, "not both"),
        ({"cron": "61 * * * *"}, ScheduleError, "is not valid"),
        ({"cron": "every day"}, ScheduleError, "is not valid"),
        ({"cron": "0 0 30 2 *"}, ScheduleError, "never fires"),
        ({"cron": 5}, TypeError, "cron must be a string"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, ScheduleError, "unknown time zone"),
        ({"cron": "* * * * *", "timezone": 1}, TypeError, "timezone must be a string"),
        ({"repeat_interval": 0.5}, ScheduleError, "1 to 31622400 seconds"),
        ({"repeat_interval": 10**400}, ScheduleError, "1 to"),
        ({"cron": "* * * * * * *"}, ScheduleError, "is not valid"),
        ({"repeat_interval": math.nan}, ScheduleError, "1 to"),
        ({"repeat_interval": True}, TypeError, "must be a number"),
        ({"repeat_interval": 5, "timezone": "UTC"}, ScheduleError, "cron schedules only"),
    ],
)
def test_bad_schedules_are_refused_with_a_reason(
    kwargs: dict[str, Any], error: type[Exception], text: str
) -> None:
    names = {"cron": "cron", "repeat_interval": "repeat_interval", "timezone": "timezone"}
    with pytest.raises(error, match=text):
        check_schedule(**{names[k]: v for k, v in kwargs.items()})


@pytest.mark.timeout(10)
def test_task_decorator_checks_its_schedule_at_import() -> None:
    with pytest.raises(ValueError, match="is not valid"):

        @task(name="test_schedules_bad", cron="* * *")
        def bad() -> None: ...

    @task(name="test_schedules_good", cron="*/5 * * * *", timezone="Europe/Paris")
    def good() -> None: ...

    rule = good.__fastworker_task__.schedule  # type: ignore[attr-defined]
    assert (rule.cron, rule.timezone) == ("*/5 * * * *", "Europe/Paris")


@pytest.mark.timeout(10)
def test_cron_ticks_in_its_time_zone_across_dst() -> None:
    rule = check_schedule("0 9 * * *", timezone="Europe/Paris")
    # 2026-03-28 12:00 UTC: the next 09:00 Paris is after the spring change (UTC+2): 07:00 UTC.
    saturday_noon = 1774699200.0
    assert rule.next_after(saturday_noon, 0) == 1774767600.0


# -- the store ---------------------------------------------------------------


@pytest.mark.timeout(10)
def test_a_one_second_cron_runs_once_per_tick_and_missed_ticks_once() -> None:
    clock = Clock()
    store = Schedules(SchedulesConfig(), wall_clock=clock)
    assert store.add(spec(cron="* * * * * *")) is None
    assert store.next_due() == T0 + 1
    ticks = []
    for _ in range(5):
        clock.now += 1
        ticks += [tick for _, tick in store.due()]
        assert store.due() == []  # asking again in the same second runs nothing
    assert ticks == [T0 + 1, T0 + 2, T0 + 3, T0 + 4, T0 + 5]
    clock.now += 3600.5  # down an hour: 3600 ticks missed
    runs = store.due()
    assert [tick for _, tick in runs] == [T0 + 6]  # once, for the first one missed
    assert store.next_due() == T0 + 3606
    assert store.stats["collapsed"] == 1


@pytest.mark.timeout(10)
def test_missed_ticks_run_once_after_a_restart_from_state() -> None:
    clock = Clock()
    store = Schedules(SchedulesConfig(), wall_clock=clock)
    store.add(spec("nightly", cron="0 2 * * *"))
    store.add(spec("often", interval=60.0))
    state = store.to_state()
    clock.now += 3 * 86400  # three nights and 4320 minutes later
    restored = Schedules.from_state(state, SchedulesConfig(), wall_clock=clock)
    runs = sorted((s.schedule_id, tick) for s, tick in restored.due())
    assert [r[0] for r in runs] == ["nightly", "often"]
    assert restored.due() == []
    assert restored.audit() == []
    # Interval ticks keep their anchor: the next is a whole number of minutes after it.
    (entry,) = [e for e in restored.listing() if e[0][0] == "often"]
    assert (entry[1] - T0) % 60 == 0
    assert entry[1] > clock.now


@pytest.mark.timeout(10)
def test_declaring_again_keeps_the_next_tick_and_a_change_starts_afresh() -> None:
    clock = Clock()
    store = Schedules(SchedulesConfig(), wall_clock=clock)
    store.add(spec("s", interval=10.0, source="declared"))
    clock.now += 7
    for _ in range(3):  # three workers declare the same schedule
        assert store.add(spec("s", interval=10.0, source="declared")) is None
    assert len(store) == 1
    assert store.next_due() == T0 + 10
    store.add(spec("s", interval=20.0, source="declared"))
    assert store.next_due() == T0 + 27
    assert store.remove("s")
    assert not store.remove("s")
    assert store.next_due() == math.inf
    assert store.audit() == []


@pytest.mark.timeout(10)
def test_store_bounds_in_count_and_bytes() -> None:
    store = Schedules(SchedulesConfig(max_schedules=2, max_bytes=1000), wall_clock=Clock())
    assert store.add(spec("a", interval=5.0)) is None
    assert store.add(spec("b", interval=5.0)) is None
    assert "limit" in (store.add(spec("c", interval=5.0)) or "")
    assert store.add(spec("a", interval=6.0)) is None  # replacing needs no new room
    assert "bytes" in (store.add(spec("b", interval=5.0, payload=b"x" * 2000)) or "")
    assert len(store) == 2
    assert store.audit() == []


@pytest.mark.timeout(10)
def test_state_round_trip_and_unreadable_entries_are_dropped() -> None:
    clock = Clock()
    store = Schedules(SchedulesConfig(), wall_clock=clock)
    store.add(spec("a", cron="*/5 * * * *"))
    store.add(spec("b", interval=30.0))
    clock.now += 31
    store.due()
    state = store.to_state()
    state["schedules"].append(
        [["bad", "job", "nonsense", None, None, 2, 1, b""], "client", 0, 0, None]
    )
    state["schedules"].append("garbage")
    again = Schedules.from_state(state, SchedulesConfig(), wall_clock=clock)
    assert list(again.listing()) == list(store.listing())
    assert again.stats["unreadable"] == 2
    with pytest.raises(ValueError, match="version"):
        Schedules.from_state({"version": 99}, SchedulesConfig(), wall_clock=clock)


@pytest.mark.timeout(10)
def test_tick_task_ids_are_stable_and_fit_a_task_id() -> None:
    assert tick_task_id("nightly", T0) == "nightly@2027-01-15T08:00:00.000+00:00"
    assert len(tick_task_id("x" * 200, T0)) <= 256


@pytest.mark.timeout(10)
def test_control_plane_refuses_bad_schedules_from_the_wire() -> None:
    clock = Clock()
    store = Schedules(SchedulesConfig(), wall_clock=clock)
    book = TaskBook(TaskBookConfig(), clock=clock, wall_clock=clock)
    dead = DeadLetters(DeadLettersConfig())

    def ask(message: Any) -> Any:
        return answer(b"c", message, book=book, schedules=store, dead=dead, budget=1 << 20)

    for bad, text in [
        (["s", "job", "61 * * * *", None, None, 2, 1, b""], "is not valid"),
        (["s", "job", None, 0.01, None, 2, 1, b""], "repeat_interval"),
        (["s", "job", "* * * * *", None, "Nowhere/Land", 2, 1, b""], "unknown time zone"),
        (["s", "job", None, None, None, 2, 1, b""], "give cron"),
        (["s" * 201, "job", None, 5, None, 2, 1, b""], "schedule id"),
        (["s", "job", None, 5, None, 9, 1, b""], "priority"),
        ("not a list", "array of 8"),
    ]:
        reply = ask(ScheduleAdd(1, bad))  # type: ignore[arg-type]  # the wire sends anything
        assert not reply.ok
        assert text in reply.message
    assert len(store) == 0
    assert ask(ScheduleAdd(2, ["s", "job", None, 5, None, 2, 1, b""])).ok
    assert ask(ScheduleList(3)).total == 1
    assert ask(ScheduleRemove(4, "s")).ok
    assert not ask(ScheduleRemove(5, "s")).ok


# -- the model ---------------------------------------------------------------

_RULES = [
    ("*/7 * * * * *", None),  # every 7 s within a minute (0, 7, …, 56): uneven gaps
    ("* * * * *", None),
    ("*/2 * * * *", None),
    (None, 5.0),
    (None, 13.0),
]


def _model_next(rule: tuple[str | None, float | None], after: float, anchor: float) -> float:
    """The first tick after ``after``, counted one tick at a time (no shortcut)."""
    cron, interval = rule
    if interval is not None:
        k = 1
        while anchor + k * interval <= after:
            k += 1
        return anchor + k * interval
    assert cron is not None
    it = croniter(cron, anchor)
    tick = float(it.get_next(float))
    while tick <= after:
        tick = float(it.get_next(float))
    return tick


class SchedulesMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.store = Schedules(SchedulesConfig(max_schedules=3), wall_clock=self.clock)
        self.store.watch()
        self.journal: dict[str, Any] = {}  # what a journal would hold: take_changes applied
        # id -> (rule, anchor, expected next tick); ticks already run per id
        self.model: dict[str, tuple[tuple[str | None, float | None], float, float]] = {}
        self.ran: dict[str, set[float]] = {}

    @rule(sid=st.sampled_from("abcd"), which=st.integers(0, len(_RULES) - 1))
    def add(self, sid: str, which: int) -> None:
        cron, interval = _RULES[which]
        refused = self.store.add(spec(sid, cron=cron, interval=interval))
        known = self.model.get(sid)
        if known is not None and known[0] == _RULES[which]:
            assert refused is None  # the same schedule again: nothing changes
            return
        if known is None and len(self.model) >= 3:
            assert refused is not None
            return
        assert refused is None
        now = self.clock.now
        self.model[sid] = (_RULES[which], now, _model_next(_RULES[which], now, now))
        self.ran[sid] = set()

    @rule(sid=st.sampled_from("abcd"))
    def remove(self, sid: str) -> None:
        assert self.store.remove(sid) == (sid in self.model)
        self.model.pop(sid, None)

    @rule(seconds=st.one_of(st.floats(0, 3), st.floats(0, 400)))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def due(self) -> None:
        now = self.clock.now
        runs = self.store.due()
        got = {s.schedule_id: tick for s, tick in runs}
        assert len(got) == len(runs), "a schedule ran twice in one due()"
        expected = {sid: nxt for sid, (_, _, nxt) in self.model.items() if nxt <= now}
        assert got == expected
        for sid, tick in got.items():
            assert tick not in self.ran[sid]
            self.ran[sid].add(tick)
            rule_, anchor, _ = self.model[sid]
            self.model[sid] = (rule_, anchor, _model_next(rule_, now, anchor))

    @invariant()
    def sound(self) -> None:
        assert self.store.audit() == []
        listing = {entry[0][0]: entry[1] for entry in self.store.listing()}
        assert listing == {sid: nxt for sid, (_, _, nxt) in self.model.items()}

    @invariant()
    def journal_mirrors_the_store(self) -> None:
        for sid, document in self.store.take_changes():
            if document is None:
                self.journal.pop(sid, None)
            else:
                self.journal[sid] = document
        assert set(self.journal) == set(self.model)  # removed ones deleted, none left behind
        again = Schedules.from_states(
            self.journal.values(), self.store.config, wall_clock=self.clock
        )
        assert list(again.listing()) == list(self.store.listing())

    @invariant()
    def state_round_trips(self) -> None:
        again = Schedules.from_state(
            self.store.to_state(), self.store.config, wall_clock=self.clock
        )
        assert list(again.listing()) == list(self.store.listing())


SchedulesMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulesModel = pytest.mark.timeout(120)(SchedulesMachine.TestCase)


_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70) | st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["* * * * *", "*/5 * * * * *", "Europe/Paris", "job", "@daily"]),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=2),
)


@pytest.mark.timeout(60)
@settings(max_examples=300, deadline=None)
@given(item=st.one_of(_ANY, st.lists(_ANY, min_size=7, max_size=9)))
def test_any_schedule_from_the_wire_gets_a_reply_not_an_exception(item: Any) -> None:
    clock = Clock()
    store = Schedules(SchedulesConfig(), wall_clock=clock)
    book = TaskBook(TaskBookConfig(), clock=clock, wall_clock=clock)
    reply = answer(
        b"c",
        ScheduleAdd(1, item),
        book=book,
        schedules=store,
        dead=DeadLetters(DeadLettersConfig()),
        budget=1 << 20,
    )
    assert reply.ok == (len(store) == 1)
    clock.now += 10**6
    store.due()
    assert store.audit() == []


@pytest.mark.timeout(10)
def test_a_periodic_task_name_must_fit_a_schedule_id() -> None:
    with pytest.raises(ValueError, match="at most 200 characters"):

        @task(name="p" * 201, repeat_interval=60)
        def long_named() -> None: ...


@pytest.mark.timeout(10)
def test_a_crowd_of_due_schedules_is_handed_out_in_bounded_turns() -> None:
    clock = Clock()
    store = Schedules(SchedulesConfig(), wall_clock=clock)
    for i in range(100):
        store.add(spec(f"s{i}", cron="* * * * *"))
    clock.now += 60
    turns = []
    while runs := store.due():
        turns.append(len(runs))
    assert turns == [MAX_RUNS_PER_TURN, 100 - MAX_RUNS_PER_TURN]
    assert store.stats["runs"] == 100
    assert store.next_due() == T0 + 120
    assert store.audit() == []


@pytest.mark.timeout(10)
def test_changes_are_recorded_only_once_watched_and_a_spent_schedule_is_deleted() -> None:
    clock = Clock()
    store = Schedules(SchedulesConfig(), wall_clock=clock)
    store.add(spec("a", interval=5.0))
    assert store.take_changes() == []  # no journal: nothing recorded
    store.watch()
    store.add(spec("a", interval=5.0))  # the same schedule again: no change
    assert store.take_changes() == []
    store.add(spec("b", cron="0 0 29 2 *"))  # 29 February: years apart
    clock.now += 5
    store.due()
    changes = dict(store.take_changes())
    assert set(changes) == {"a", "b"}
    assert changes["a"] is not None
    assert changes["a"]["schedules"][0][4] == T0 + 5  # its last run
    assert store.take_changes() == []
    assert store.remove("b")
    assert store.take_changes() == [("b", None)]
