"""Shared test helpers: tiny random-weight checkpoints written by `transformers` (test-only).

    make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "llama")   -> the folder (a Path)

gives a folder exactly like a hub checkpoint (config.json, model.safetensors or shards,
generation_config.json, tokenizer.json), so model.load_model() reads it like a real model,
and the transformers model it was saved from serves as the reference implementation.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the flat project modules

# Small but not degenerate: GQA (4 query heads per 2 KV heads), several RoPE frequency bands.
TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
)

# What each architecture exercises (the facts of the real model families):
ARCH_EXTRAS = {
    # Llama 3.1-style rope scaling, with an original context short enough that all three
    # frequency bands (kept / interpolated / divided by factor) occur at head_dim 16.
    "LlamaForCausalLM": dict(
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        )
    ),
    "MistralForCausalLM": dict(
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), sliding_window=None
    ),  # Mistral 7B v0.2 / v0.3: no sliding window
    "Qwen2ForCausalLM": dict(
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), tie_word_embeddings=True
    ),  # q/k/v bias is implied by the architecture
    "Qwen3ForCausalLM": dict(
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), head_dim=32
    ),  # explicit head_dim != hidden / heads, q/k norm implied
    # Qwen3-30B-A3B in miniature: Qwen3 attention, 8 experts of which 2 run per token, renormalised
    "Qwen3MoeForCausalLM": dict(
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
    ),
}
SPECIAL_TOKENS = {
    "LlamaForCausalLM": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ],
    "MistralForCausalLM": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],  # v0.3's control tokens
    "Qwen2ForCausalLM": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "Qwen3ForCausalLM": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "Qwen3MoeForCausalLM": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}


def tiny_tokenizer(special_tokens):
    """A byte-level BPE tokenizer with the 256 byte symbols, no merges, and the special tokens
    (ids 256...): every text round-trips, and the chat formats find their tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols
    vocab = {s: i for i, s in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tok


def word_tokenizer(words):
    """A word-level tokenizer (whitespace split, [UNK] for the rest) with no special tokens at all:
    what a base model's or a home-made checkpoint's tokenizer may look like."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return tok


def sentencepiece_tokenizer(control_tokens=()):
    """A Llama-2 / Mistral style tokenizer.json: <unk> <s> </s> (ids 0, 1, 2), then control_tokens
    (Mistral v0.3: [INST], [/INST]), the 256 <0xNN> byte-fallback pieces, "▁" and a few letters
    with merges for "▁[", "INST"; spaces become "▁" and a "▁" is prepended, as in Llama 2's."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    pieces = ["<unk>", "<s>", "</s>", *control_tokens] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", *"abcdefghijklmnopqrstuvwxyz", *"[]/INST", "▁[", "IN", "ST", "INST"]
    merges = [("▁", "["), ("I", "N"), ("S", "T"), ("IN", "ST")]
    tok = Tokenizer(
        models.BPE(
            vocab={p: i for i, p in enumerate(pieces)},
            merges=merges,
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>", *control_tokens]]
    )
    return tok


def make_tiny_checkpoint(
    arch, path, *, seed=0, max_shard_size=None, hub_style=False, tokenizer=None, **overrides
):
    """Save a tiny random `arch` model (a transformers class name) to path; returns (path, hf_model).

    Weights are redrawn with a seeded generator at a scale where logits are O(1) (the default
    init would make every logit ~0 and any parity check trivially pass); biases and norm
    weights are random too, so loading them wrongly shows. max_shard_size (e.g. "60KB")
    writes a sharded checkpoint with model.safetensors.index.json. hub_style rewrites
    config.json the way hub checkpoints carry it (top-level rope_theta / rope_scaling)
    instead of transformers 5's rope_parameters. tokenizer (a `tokenizers.Tokenizer`) replaces the
    byte-level one with the architecture's chat tokens. overrides go to the transformers config.
    """
    import transformers

    path = Path(path)
    cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    kw = dict(TINY) | ARCH_EXTRAS[arch]
    kw.update(bos_token_id=256, eos_token_id=[257, 258])
    kw.update(overrides)
    config = cfg_cls(**kw)
    torch.manual_seed(seed)
    hf = getattr(transformers, arch)(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:  # scale so activations keep a unit-ish size
                p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)
    save_kw = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    hf.save_pretrained(path, **save_kw)
    (tokenizer or tiny_tokenizer(SPECIAL_TOKENS[arch])).save(str(path / "tokenizer.json"))
    if hub_style:
        c = json.loads((path / "config.json").read_text())
        rope = c.pop("rope_parameters")
        c["rope_theta"] = rope.pop("rope_theta")
        c["rope_scaling"] = None if rope["rope_type"] == "default" else rope
        (path / "config.json").write_text(json.dumps(c, indent=2))
    return path, hf


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """make_tiny_checkpoint with tmp_path as the parent folder: tiny_checkpoint(arch, **kw)."""
    return lambda arch, **kw: make_tiny_checkpoint(arch, tmp_path / arch, **kw)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: tiny models gain nothing from threads, and on a shared, busy machine
    OpenMP threads that wait for each other make every small op slow (use: pytestmark = usefixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
