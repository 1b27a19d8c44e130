"""The users behind a workload (`sim.workload.Users`) on their own, against a fake target.

Three sessions, built by hand (turn index: session, turn, arrival):
  0: a/0 at 3.0    1: a/1 think 4 s    2: a/2 think 0 s
  3: b/0 at 1.0    4: b/1 pinned at 20.0 (a trace timestamp)
  5: c/0 at 3.0
"""

import math

import numpy as np
import simpy

from sim.workload import Users, Workload

NAN = math.nan


def _workload():
    return Workload(session=["a", "a", "a", "b", "b", "c"],
                    turn=np.array([0, 1, 2, 0, 1, 0]),
                    arrival_s=np.array([3.0, NAN, NAN, 1.0, 20.0, 3.0]),
                    think_s=np.array([NAN, 4.0, 0.0, NAN, NAN, NAN]),
                    prompt_tokens=np.full(6, 10), output_tokens=np.full(6, 5),
                    prefix_hashes=[None] * 6,
                    next_turn=np.array([1, 2, -1, 4, -1, -1]),
                    first_turns=np.array([0, 3, 5]))


class Recorder:
    """A target that only records what it is sent: (turn, arrival, SimPy time of the call)."""

    def __init__(self, env):
        self.env, self.got = env, []

    def submit(self, i, arrival_s):
        self.got.append((i, arrival_s, self.env.now))


def _users():
    env = simpy.Environment()
    target = Recorder(env)
    return env, target, Users(env, _workload(), target)


def test_first_turns_are_delivered_at_their_times_in_time_order():
    """Guards the first turns' order (time, then turn index) and early delivery."""
    env, target, users = _users()
    assert users.next_arrival_s() == 1.0
    users.deliver_due(0.5)
    assert target.got == []
    users.deliver_due(3.0)
    assert [(i, t) for i, t, _ in target.got] == [(3, 1.0), (0, 3.0), (5, 3.0)]
    assert users.next_arrival_s() == math.inf   # later turns wait for their replies


def test_next_turn_arrives_after_the_reply_is_read_plus_think_time():
    """Guards the session continuation: think time counted from when the user can read the reply
    (after a synchronous save: 10.5), not from its end (10.0), nor from the turn's arrival."""
    env, target, users = _users()
    users.deliver_due(3.0)
    users.reply_done(0, 10.0, 10.5)
    assert users.next_arrival_s() == 14.5                  # 10.5 + 4
    users.deliver_due(14.5)
    users.reply_done(1, 20.0, 20.0)
    assert users.next_arrival_s() == 20.0                  # think 0: at once
    assert [(i, t) for i, t, _ in target.got][-1] == (1, 14.5)


def test_a_pinned_next_turn_keeps_its_time_but_never_precedes_the_reply_end():
    """Guards a trace timestamp sending a turn before its previous reply ended (the session's
    history would not exist yet) and a pinned time being replaced by a think time."""
    env, target, users = _users()
    users.deliver_due(3.0)
    users.reply_done(3, 15.0, 15.0)
    assert users.next_arrival_s() == 20.0                  # pinned, after the reply: kept
    env2, target2, late = _users()
    late.deliver_due(3.0)
    late.reply_done(3, 25.0, 25.0)
    assert late.next_arrival_s() == 25.0                   # pinned before the reply end: at the end


def test_all_done_fires_after_the_last_reply_only():
    """Guards the run ending early (a turn never served) or never (the simulation hangs)."""
    env, target, users = _users()
    for i in (3, 0, 5, 1, 4):
        users.reply_done(i, 30.0, 30.0)
        assert not users.all_done.triggered
    users.reply_done(2, 31.0, 31.0)
    assert users.all_done.triggered
    empty = Workload(["x"][:0], np.zeros(0, int), np.zeros(0), np.zeros(0), np.zeros(0, int), np.zeros(0, int),
                     [], np.zeros(0, int), np.zeros(0, int))
    assert Users(simpy.Environment(), empty, None).all_done.triggered


def test_listen_rings_at_the_next_arrival_and_submits_everything_then_due():
    """Guards an idle target that is never woken, woken early, or woken once for two arrivals at the
    same time (a/0 and c/0 at 3.0)."""
    env, target, users = _users()
    users.listen()
    env.run(until=2.0)
    assert target.got == [(3, 1.0, 1.0)]
    users.listen()
    env.run(until=10.0)
    assert target.got[1:] == [(0, 3.0, 3.0), (5, 3.0, 3.0)]


def test_listen_with_nothing_pending_sets_no_alarm_and_a_late_alarm_keeps_the_arrival_time():
    """Guards a spurious event when every session is mid-reply, and an arrival stamped with the
    time the target listened rather than its own: a target listening late (at 5.0) is rung at once
    with the arrival due at the alarm's time (1.0); the rest stay for its own deliver_due."""
    env, target, users = _users()
    users.deliver_due(3.0)
    users.listen()
    assert env.peek() == math.inf
    env2, target2, users2 = _users()
    env2.run(until=5.0)
    users2.listen()
    env2.run(until=6.0)
    assert target2.got == [(3, 1.0, 5.0)]
    assert users2.next_arrival_s() == 3.0


def test_sessions_run_to_completion_against_a_server_of_fixed_service_time():
    """Guards the whole continuation loop end to end: each turn is served for 2 s as it arrives.
    a: 3 -> 5, then 5 + 4 = 9 -> 11, then 11 + 0 -> 13; b: 1 -> 3, then pinned 20 -> 22; c: 3 -> 5.
    The run ends at the last reply, 22."""
    env = simpy.Environment()
    arrivals = {}

    class Server:
        def submit(self, i, arrival_s):
            arrivals[i] = arrival_s
            env.process(self.serve(i))
            users.listen()

        def serve(self, i):
            yield env.timeout(2.0)
            users.reply_done(i, env.now, env.now)
            users.listen()

    users = Users(env, _workload(), Server())
    users.listen()
    env.run(until=users.all_done)
    assert arrivals == {3: 1.0, 0: 3.0, 5: 3.0, 1: 9.0, 2: 11.0, 4: 20.0}
    assert env.now == 22.0


def test_the_heap_holds_one_first_turn_at_a_time_yet_yields_every_turn_in_time_order():
    """Guards the lazy feed of first turns (`Users.next_first`): the heap holds the turns sent after a
    reply and only the earliest first turn not yet taken, and a turn sent after a reply still comes before
    a later session's first turn."""
    wl = Workload(session=["x", "x", "y", "z"], turn=np.array([0, 1, 0, 0]),
                  arrival_s=np.array([1.0, NAN, 5.0, 5.0]), think_s=np.array([NAN, 1.0, NAN, NAN]),
                  prompt_tokens=np.full(4, 10), output_tokens=np.full(4, 5), prefix_hashes=[None] * 4,
                  next_turn=np.array([1, -1, -1, -1]), first_turns=np.array([3, 2, 0]))
    env = simpy.Environment()
    target = Recorder(env)
    users = Users(env, wl, target)
    assert users.pending == [(1.0, 0)] and users.first == 0
    users.deliver_due(1.0)
    assert users.pending == [(5.0, 2)]                     # y/0 (5.0, index 2) before z/0 (5.0, index 3)
    users.reply_done(0, 1.5, 2.0)                          # x/1 at 2.0 + 1.0
    assert users.next_arrival_s() == 3.0 and len(users.pending) == 2
    users.deliver_due(10.0)
    assert [(i, t) for i, t, _ in target.got] == [(0, 1.0), (1, 3.0), (2, 5.0), (3, 5.0)]
    assert users.pending == [] and users.first == -1
