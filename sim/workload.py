"""Sessions, turns and arrivals: a canonical trace (sim/trace.py) turned into flat per-turn arrays,
and the users who send them (`Users`, the simulation's source of arrivals).

Turn 0 of a session arrives at its `arrival_s`; each later turn arrives `think_s` after the previous
reply ended (or at its own `arrival_s` when the trace fixes it, as Mooncake's timestamps do).
"""
from __future__ import annotations

import dataclasses
from heapq import heappop, heappush
from array import array
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sim import trace_synth
from sim.trace import read_trace, validate_trace


@dataclass
class Workload:
    session: list  # str per turn
    turn: np.ndarray
    arrival_s: np.ndarray  # NaN where the turn arrives think_s after the previous reply
    think_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    prefix_hashes: list  # None or list[int] per turn
    next_turn: np.ndarray  # index of the session's next turn, -1 for the last
    first_turns: np.ndarray  # indices of turn 0 of every session

    def __len__(self) -> int:
        return len(self.turn)


def draw_think_times(rng, n: int, mean_s: float, dist: str = "exponential", sigma: float = 1.0) -> np.ndarray:
    """User think times with the given mean: exponential, lognormal (log-sd sigma) or fixed."""
    if mean_s == 0 or dist == "fixed":
        return np.full(n, float(mean_s))
    if dist == "lognormal":
        return rng.lognormal(math.log(mean_s) - sigma * sigma / 2.0, sigma, size=n)
    return rng.exponential(mean_s, size=n)


def build_workload(df: pd.DataFrame, seed: int, session_rate_per_s=None, think_time_mean_s=None,
                   max_sessions=None, max_output_tokens=None, think_time_dist="exponential",
                   think_time_sigma=1.0) -> Workload:
    df = validate_trace(df)
    if max_sessions is not None:
        keep = pd.unique(df.sort_values(["arrival_s"], kind="stable").loc[df["turn"] == 0, "session_id"])[:max_sessions]
        df = df[df["session_id"].isin(set(keep))].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    arrival = df["arrival_s"].to_numpy(dtype=float).copy()
    think = df["think_s"].to_numpy(dtype=float).copy()
    turn = df["turn"].to_numpy(dtype=np.int64)
    first = np.flatnonzero(turn == 0)
    if session_rate_per_s is not None:
        # Poisson session arrivals; the order of sessions follows their original start times
        order = first[np.argsort(arrival[first], kind="stable")]
        starts = np.cumsum(rng.exponential(1.0 / session_rate_per_s, size=len(order)))
        arrival[order] = starts - starts[0]
        arrival[turn > 0] = math.nan  # later turns follow think times, not fixed stamps
    if think_time_mean_s is not None:
        later = turn > 0
        think[later] = draw_think_times(rng, int(later.sum()), think_time_mean_s, think_time_dist, think_time_sigma)
        arrival[later] = math.nan
    later = (turn > 0) & np.isnan(arrival) & np.isnan(think)
    think[later] = 0.0
    output = df["output_tokens"].to_numpy(dtype=np.int64).copy()
    if max_output_tokens is not None:
        np.minimum(output, max_output_tokens, out=output)
    n = len(df)
    # one string object per session, shared by its turns (a per-turn copy costs ~60 bytes a turn)
    codes, uniques = pd.factorize(df["session_id"], sort=False)
    uniques = list(uniques)
    sess = [uniques[c] for c in codes.tolist()]
    nxt = np.full(n, -1, dtype=np.int64)
    same = np.array(sess[1:], dtype=object) == np.array(sess[:-1], dtype=object) if n > 1 else np.zeros(0, bool)
    nxt[:-1][same] = np.arange(1, n)[same]
    hashes = [h if h is not None and len(h) else None for h in df["prefix_hashes"].tolist()]
    hashes = [list(h) if h is not None else None for h in hashes]
    return Workload(sess, turn, arrival, think, df["prompt_tokens"].to_numpy(dtype=np.int64), output,
                    hashes, nxt, first)


def load_workload(cfg, df: pd.DataFrame | None = None) -> Workload:
    """The config's workload: its trace file, the given trace rows, or the synthetic generator."""
    wl = cfg.workload
    if df is None and wl.trace:
        df = read_trace(wl.trace)
    elif df is None:
        spec = dataclasses.replace(trace_synth.SynthSpec.default(), n_sessions=wl.synthetic.n_sessions)
        df = trace_synth.generate(spec, seed=cfg.seed)
    return build_workload(df, cfg.seed, wl.session_rate_per_s, wl.think_time_mean_s, wl.max_sessions,
                          wl.max_output_tokens, wl.think_time_dist, wl.think_time_sigma)


class Users:
    """The users behind a workload: they send each session's first turn at its arrival time and the
    next turn when they have read the reply (its end plus their think time, or the trace's own stamp).

    Arrivals go to `target.submit(turn, arrival_s)` (a replica today, a router tomorrow). A target that
    runs ahead of SimPy's clock (a replica advances a whole prefill or decode span at once) pulls what
    is due by its own clock with `deliver_due(now)` and cuts its spans at `next_arrival_s()`, a lower
    bound on its next submission. An idle target waits on `listen()`: an alarm at the users' next
    arrival, which submits it and then wakes the target (one event per idle period, none for
    arrivals that find the target busy). The target reports each reply's end with `reply_done`. A target
    that pops `pending` itself (the chunked engine, to skip a call a turn) calls `next_first()` when the
    turn it popped is `first`, as `deliver_due` does.
    """

    def __init__(self, env, workload: Workload, target):
        self.env, self.target = env, target
        # heap (arrival time, turn index); a target may peek at its head. Sessions' first turns join it one
        # at a time, in arrival order: it holds the turns sent after a reply and only the earliest first turn
        # not yet taken (`first`), so it stays as small as the sessions in progress (a pop sifts through
        # its depth) while its head is still the earliest of all. Whoever pops `first` calls `next_first()`.
        self.pending = []
        self.remaining = len(workload)
        self.all_done = env.event()
        # typed arrays: 8 bytes a turn each (a list of floats holds 32), read as plain Python numbers
        self.arrival_s = array("d", workload.arrival_s.astype(float).tobytes())
        self.think_s = array("d", workload.think_s.astype(float).tobytes())
        self.next_turn = array("q", workload.next_turn.astype(np.int64).tobytes())
        firsts = workload.first_turns.astype(np.int64)
        # in the heap's order: by arrival time, then turn index
        self._firsts = array("q", firsts[np.lexsort((firsts, workload.arrival_s[firsts]))].tobytes())
        self._k = -1
        self.first = -1  # the first turn in the heap (-1: none left)
        self.next_first()
        if not self.remaining:
            self.all_done.succeed()

    def next_first(self) -> None:
        """The first turn in the heap was taken: the next session's first turn joins it."""
        k = self._k = self._k + 1
        if k < len(self._firsts):
            i = self.first = self._firsts[k]
            heappush(self.pending, (self.arrival_s[i], i))
        else:
            self.first = -1

    def next_arrival_s(self) -> float:
        return self.pending[0][0] if self.pending else math.inf

    def deliver_due(self, now: float) -> None:
        pending = self.pending
        while pending and pending[0][0] <= now:
            t, i = heappop(pending)
            if i == self.first:
                self.next_first()
            self.target.submit(i, t)

    def listen(self):
        """An event that fires once the target's next submission has been made (its value: the
        arrival time), for a target that waits idle. With no arrival pending the target cannot be idle
        for long: a session of its own is still running and will report its reply."""
        if not self.pending:
            return self.env.event()
        t = self.pending[0][0]
        ev = self.env.timeout(max(t - self.env.now, 0.0), t)
        # runs before the waiting target resumes (callbacks run in the order they were added)
        ev.callbacks.append(self._ring)
        return ev

    def _ring(self, ev) -> None:
        self.deliver_due(ev.value)

    def reply_done(self, i: int, end_s: float, ready_s: float) -> None:
        """Turn `i`'s reply ended at `end_s` (the user can read it from `ready_s`, after a synchronous
        save); its session's next turn is sent after the user's think time, never before `end_s`."""
        self.remaining -= 1
        if not self.remaining:
            self.all_done.succeed()
        nxt = self.next_turn[i]
        if nxt < 0:
            return
        t = self.arrival_s[nxt]
        if t != t:  # NaN: the user thinks after reading the reply
            t = ready_s + self.think_s[nxt]
        heappush(self.pending, (t if t > end_s else end_s, nxt))
