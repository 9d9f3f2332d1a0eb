"""Parameter sets: lists of (name, shape) that stand for a model's parameters.

Only the shapes matter to an optimizer step; the values are random. The lists follow
the real models' layouts tensor by tensor, so the number of tensors (launch overhead,
chunking) and the size distribution (tails, tiny biases) are those a user meets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class ParamSet:
    name: str  # "flat-32M", "gpt2-small", "llama-1B", "tiny-4096x768"
    tensors: Tuple[Tuple[str, Shape], ...]

    @property
    def n_tensors(self) -> int:
        return len(self.tensors)

    @property
    def numels(self) -> List[int]:
        return [math.prod(shape) for _, shape in self.tensors]

    @property
    def n_elements(self) -> int:
        return sum(self.numels)


def parse_size(text: str) -> int:
    """'32M' -> 32 * 2**20, '1G' -> 2**30, '4096' -> 4096 (binary multiples: aligned sizes)."""
    text = str(text).strip().upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}
    if text and text[-1] in mult:
        return int(float(text[:-1]) * mult[text[-1]])
    return int(text)


def size_label(n: int) -> str:
    for suffix, mult in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


def flat(n: int) -> ParamSet:
    """One flat tensor of n elements: the pure bandwidth case."""
    return ParamSet(f"flat-{size_label(n)}", (("flat", (n,)),))


def gpt2_small() -> ParamSet:
    """GPT-2 small (124M) as in the Hugging Face checkpoint: 148 tensors, 124,439,808 elements.

    Conv1D weights are stored (in, out) there; the layout does not change the byte count.
    """
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    t: List[Tuple[str, Shape]] = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(layers):
        h = f"h.{i}."
        t += [
            (h + "ln_1.weight", (d,)),
            (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)),
            (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)),
            (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)),
            (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)),
            (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)),
            (h + "mlp.c_proj.bias", (d,)),
        ]
    t += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return ParamSet("gpt2-small", tuple(t))


# Llama-style configs: (hidden, intermediate, layers, heads, kv_heads, vocab).
# 125M/350M are GPT-3-paper sizes in Llama layout; 1B is TinyLlama-1.1B (GQA, 4 kv heads).
LLAMA_CONFIGS = {
    "125M": (768, 2048, 12, 12, 12, 32000),
    "350M": (1024, 2816, 24, 16, 16, 32000),
    "1B": (2048, 5632, 22, 32, 4, 32000),
}


def llama(size: str = "1B") -> ParamSet:
    """A Llama-style decoder: embedding, per layer q/k/v/o + gate/up/down + 2 RMSNorms,
    final norm, untied lm_head. No biases."""
    if size not in LLAMA_CONFIGS:
        raise ValueError(f"unknown llama size {size!r}; choose from {sorted(LLAMA_CONFIGS)}")
    d, ffn, layers, heads, kv_heads, vocab = LLAMA_CONFIGS[size]
    kv = d // heads * kv_heads
    t: List[Tuple[str, Shape]] = [("embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"layers.{i}."
        t += [
            (p + "self_attn.q_proj.weight", (d, d)),
            (p + "self_attn.k_proj.weight", (kv, d)),
            (p + "self_attn.v_proj.weight", (kv, d)),
            (p + "self_attn.o_proj.weight", (d, d)),
            (p + "mlp.gate_proj.weight", (ffn, d)),
            (p + "mlp.up_proj.weight", (ffn, d)),
            (p + "mlp.down_proj.weight", (d, ffn)),
            (p + "input_layernorm.weight", (d,)),
            (p + "post_attention_layernorm.weight", (d,)),
        ]
    t += [("norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    return ParamSet(f"llama-{size}", tuple(t))


def tiny(count: int = 4096, size: int = 768) -> ParamSet:
    """Many tiny tensors (biases): the launch/overhead-bound case."""
    return ParamSet(f"tiny-{count}x{size}", tuple((f"bias.{i}", (size,)) for i in range(count)))


def build(spec: str, *, flat_size: int, llama_size: str, tiny_count: int = 4096) -> ParamSet:
    """A parameter set from its short name: flat, gpt2, llama, tiny."""
    if spec == "flat":
        return flat(flat_size)
    if spec == "gpt2":
        return gpt2_small()
    if spec == "llama":
        return llama(llama_size)
    if spec == "tiny":
        return tiny(tiny_count)
    raise ValueError(f"unknown parameter set {spec!r}; choose from flat, gpt2, llama, tiny")
