"""Step-indexed request stream: the one input that vLLM's V1 scheduler (drive_vllm.py) and kvsim's
chunked scheduler both consume, so their per-step decisions can be compared without a clock.

A stream is JSONL: a header line, then one line per request (one turn of a conversation).

* Turn 0 of a session arrives at a fixed `arrival_step`. Turn k > 0 is released `think_steps` steps
  after the step whose output finished turn k-1 (see `Releases`).
* Token ids are never stored: every session is one token sequence, given by `session_token`, whose
  first `system_prompt_tokens` ids are the same in every session (a shared system prompt). Turn k's
  prompt is the session's tokens [0, prompt_tokens) and its reply is [prompt_tokens, prompt_tokens +
  max_tokens), so turn k+1's prompt starts with turn k's prompt and reply: the history is an exact
  prefix and vLLM's prefix cache hits exactly where `block_key` says two blocks are equal.

Stdlib only: drive_vllm.py imports it from vLLM's own virtual environment. Building a stream from a
trace (`build_stream`) needs pandas and numpy, imported there.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

FORMAT = "kvsim-step-stream/1"

# Token-id rule. Ids stay below LLaMA's 32,000-token vocabulary. System-prompt tokens are
# SYSTEM_BASE + position; content tokens are CONTENT_BASE + (session * SESSION_STRIDE + position)
# mod CONTENT_SPAN. SESSION_STRIDE is coprime with CONTENT_SPAN, so two sessions (< CONTENT_SPAN of
# them) differ at *every* content position: a block that holds any content token is never equal
# across sessions, and one whose tokens are all system prompt always is.
SYSTEM_BASE = 100
CONTENT_BASE = 1_000
CONTENT_SPAN = 30_000
SESSION_STRIDE = 7_919  # prime, does not divide 30,000


@dataclass(frozen=True)
class StreamHeader:
    format: str
    block_size: int
    system_prompt_tokens: int
    max_model_len: int
    source: str
    seed: int
    session_gap_steps: float
    step_s: float
    think_scale: float
    max_reply_tokens: int | None


@dataclass(frozen=True)
class StreamRequest:
    id: str
    session: int
    turn: int
    prompt_tokens: int  # the whole input: system prompt + history + this turn's new tokens
    new_tokens: int  # what this turn adds after the history (the user message)
    max_tokens: int  # the reply length; every reply runs to it (no EOS in fabricated output)
    arrival_step: int | None  # turn 0 only
    think_steps: int | None  # turn > 0: steps after the previous turn's finishing step


def session_token(session: int, position: int, system_prompt_tokens: int) -> int:
    if position < system_prompt_tokens:
        return SYSTEM_BASE + position
    return CONTENT_BASE + (session * SESSION_STRIDE + position) % CONTENT_SPAN


def token_ids(session: int, start: int, end: int, system_prompt_tokens: int) -> list[int]:
    return [session_token(session, p, system_prompt_tokens) for p in range(start, end)]


def prompt_token_ids(req: StreamRequest, header: StreamHeader) -> list[int]:
    return token_ids(req.session, 0, req.prompt_tokens, header.system_prompt_tokens)


def reply_token_ids(req: StreamRequest, header: StreamHeader) -> list[int]:
    return token_ids(req.session, req.prompt_tokens, req.prompt_tokens + req.max_tokens,
                     header.system_prompt_tokens)


def block_key(session: int, index: int, block_size: int, system_prompt_tokens: int) -> tuple:
    """Identity of the KV block covering positions [index*block_size, (index+1)*block_size) of a
    session: equal for two blocks exactly when vLLM's chained block hashes are equal."""
    if (index + 1) * block_size <= system_prompt_tokens:
        return ("system", index)
    return (session, index)


class Releases:
    """When each request becomes visible to the scheduler.

    Before the scheduler's step t, every request due at a step <= t is added, in order of (due
    step, line index in the stream). Turn 0 is due at its arrival_step; turn k > 0 becomes due at
    finish_step(k-1) + think_steps(k), where finish_step is the step whose output finished turn k-1.
    """

    def __init__(self, requests: list[StreamRequest]):
        self._requests = requests
        self._index = {r.id: i for i, r in enumerate(requests)}
        self._next_turn: dict[str, int] = {}
        for i, r in enumerate(requests[:-1]):
            nxt = requests[i + 1]
            if nxt.session == r.session and nxt.turn == r.turn + 1:
                self._next_turn[r.id] = i + 1
        self._due: dict[int, int] = {i: r.arrival_step for i, r in enumerate(requests) if r.turn == 0}
        self.released = 0

    def finished(self, req_id: str, step: int) -> None:
        nxt = self._next_turn.get(req_id)
        if nxt is not None:
            self._due[nxt] = step + self._requests[nxt].think_steps

    def due(self, step: int) -> list[StreamRequest]:
        ready = sorted((d, i) for i, d in self._due.items() if d <= step)
        for _, i in ready:
            del self._due[i]
        self.released += len(ready)
        return [self._requests[i] for _, i in ready]

    def next_due_step(self) -> int | None:
        return min(self._due.values()) if self._due else None


def read_stream(path) -> tuple[StreamHeader, list[StreamRequest]]:
    path = Path(path)
    lines = path.read_text().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty stream (expected a header line, then one line per request)")
    head = json.loads(lines[0])
    if head.get("format") != FORMAT:
        raise ValueError(f"{path}:1: format is {head.get('format')!r}, expected {FORMAT!r}")
    header = StreamHeader(**head)
    requests = [StreamRequest(**json.loads(line)) for line in lines[1:] if line.strip()]
    return header, requests


def stream_text(header: StreamHeader, requests: list[StreamRequest]) -> str:
    rows = [json.dumps(asdict(header))] + [json.dumps(asdict(r)) for r in requests]
    return "\n".join(rows) + "\n"


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_stream(df, *, requests: int, session_gap_steps: float, seed: int, step_s: float = 0.03,
                 think_scale: float = 1.0, block_size: int = 16, system_prompt_tokens: int = 120,
                 max_model_len: int = 16384, max_reply_tokens: int | None = None,
                 source: str = "") -> tuple[StreamHeader, list[StreamRequest]]:
    """Sample whole sessions of a canonical trace (traces/README.md) with replacement until the
    stream holds `requests` turns; each copy is a new session. A session ends before the first
    turn whose prompt + reply would pass max_model_len (vLLM caps it there; kvsim would truncate
    the history, and the two would stop being comparable). Session starts are a Poisson process
    with a mean gap of `session_gap_steps`; think times become steps of `step_s` seconds.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    by_session = [g.sort_values("turn") for _, g in df.groupby("session_id", sort=True)]
    out: list[StreamRequest] = []
    session = 0
    step = 0.0
    while len(out) < requests:
        turns = by_session[int(rng.integers(len(by_session)))]
        step += float(rng.exponential(session_gap_steps)) if session else 0.0
        context = system_prompt_tokens
        kept = []
        for row in turns.itertuples():
            reply = int(row.output_tokens)
            if max_reply_tokens is not None:
                reply = min(reply, max_reply_tokens)
            prompt = context + int(row.prompt_tokens)
            if prompt + reply > max_model_len or len(out) + len(kept) >= requests:
                break
            think = None
            if row.turn > 0:
                think = max(1, int(round(float(row.think_s) * think_scale / step_s)))
            kept.append(StreamRequest(
                id=f"s{session:04d}-t{int(row.turn)}", session=session, turn=int(row.turn),
                prompt_tokens=prompt, new_tokens=int(row.prompt_tokens), max_tokens=reply,
                arrival_step=int(round(step)) if row.turn == 0 else None, think_steps=think))
            context = prompt + reply
        if kept:
            out.extend(kept)
            session += 1
    if session >= CONTENT_SPAN:
        raise ValueError(f"{session} sessions: the token-id rule keeps sessions distinct only below {CONTENT_SPAN}")
    header = StreamHeader(format=FORMAT, block_size=block_size, system_prompt_tokens=system_prompt_tokens,
                          max_model_len=max_model_len, source=source, seed=seed,
                          session_gap_steps=session_gap_steps, step_s=step_s, think_scale=think_scale,
                          max_reply_tokens=max_reply_tokens)
    return header, out


def main(argv=None) -> int:
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    from sim.files import atomic_write_text
    from sim.trace import read_trace

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(root / "traces/sharegpt_small.parquet"))
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--session-gap-steps", type=float, required=True,
                    help="mean steps between two sessions' first turns (the load knob)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step-s", type=float, default=0.03, help="seconds one step stands for (think time -> steps)")
    ap.add_argument("--think-scale", type=float, default=1.0)
    ap.add_argument("--system-prompt-tokens", type=int, default=120)
    ap.add_argument("--max-model-len", type=int, default=16384)
    ap.add_argument("--max-reply-tokens", type=int, default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    df = read_trace(a.trace)
    header, reqs = build_stream(
        df, requests=a.requests, session_gap_steps=a.session_gap_steps, seed=a.seed, step_s=a.step_s,
        think_scale=a.think_scale, system_prompt_tokens=a.system_prompt_tokens,
        max_model_len=a.max_model_len, max_reply_tokens=a.max_reply_tokens,
        source=Path(a.trace).name)
    atomic_write_text(a.out, stream_text(header, reqs))
    sessions = len({r.session for r in reqs})
    print(f"{a.out}: {len(reqs)} requests, {sessions} sessions, "
          f"{sum(r.prompt_tokens for r in reqs):,} prompt tokens, {sum(r.max_tokens for r in reqs):,} reply tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
