"""Every policy of policy.PRESETS inside a transformers causal LM: `generate` on a model the user already has.

    from transformers import AutoModelForCausalLM
    import hf
    from policy import make_policy

    model = AutoModelForCausalLM.from_pretrained(folder)  # Llama, Mistral, Qwen2, Qwen3 or Qwen3-MoE
    cache = hf.policy_cache(model, make_policy("quantized", track=True))
    out = model.generate(input_ids, cache=cache, max_new_tokens=64, do_sample=False)
    print(cache.budget_line(), cache.stats.summary()["oracle_recall"], cache.bytes_fetched)

The prompt runs with full attention into a kvcache.FullCache; the first decode step builds the policy's cache from
it (kvcache.from_prefill: the prompt's middle K/V go to the offload store, the landmarks stay on the device), and
every layer of every decode step attends through it (SparseCache.attend). transformers' own cache never holds the
prompt: the model reads only the rows a policy selects, fetched from CPU memory where the policy offloads.

It reaches inside transformers through the two extension points transformers has for this, and patches nothing:

  - its Cache class: `policy_cache` returns a transformers Cache (`Bridge`, made a subclass of transformers.Cache
    on first use). Every attention module calls cache.update(k, v, layer, kwargs=...) with the post-RoPE keys and
    values of its new tokens and the keyword arguments of the attention call to come; the bridge writes itself into
    those arguments (as transformers' own paged cache writes its block tables there) and returns k, v unchanged.
  - its attention-function registry: `attention` is registered as ATTENTION ("kvoffload") and becomes the model's
    attention implementation. Called with the post-RoPE q, k, v of the new tokens and a bridge, it returns what the
    cache behind the bridge computes, `attend(layer, q, k, v, pos, **asked)` (model.py's cache protocol); called
    without one (the model with transformers' own cache, or none), it is the registry's sdpa function, with sdpa's
    masks, so the model keeps working as before.

What each policy needs from the model comes through them, or the policy is refused with one line before any work
(`check`):
  - RoPE, to rebuild low-rank keys at their positions (svd, shadowkv) and to rotate keys stored before RoPE (paper):
    a model.Rope (`ModelRope`) with the model's own cos / sin tables, for the RoPE kinds model.Rope applies, as
    model.py's own reading of a config finds them (model.config_from_dict). A model whose RoPE it does not apply
    (rope_type yarn, dynamic, longrope...) runs every other policy.
  - the prefill's queries (LRQK): the attention function hands them to the prefill's FullCache(keep_queries=True).
  - the next layer's query (InfiniGen, `SparseCache.asks`): computed from a layer's normalised input, which neither
    the cache nor the attention function is given; a forward pre-hook on each attention module (torch's own
    extension point) hands that input to the bridge, which computes the next layer's query with that layer's own
    q_proj (and q_norm) and the model's own cos / sin, only while the cache asks for it. Its calibration (skew.py) is
    fitted through the same bridge (`calibration`), cached apart from model.py's (each engine its own numbers).

`Engine` puts model.py's interface over a transformers model (engine(input_ids, cache, last_only) -> float32
logits, .config, .rope), so model.prefill, model.decode, skew.fit and evaluate.py's decoding run through it
unchanged (`python evaluate.py --engine transformers`): any object with the cache protocol (attend, seq_len, asks)
can sit behind the model, for a decode step of B rows x 1 token (kvcache.StackedCache) or one row x T tokens.

transformers is imported on first use (`_transformers`), so the project runs without it: only this module needs it.
"""

import functools

import torch

import kvcache
import skew
from model import (
    ARCHITECTURES,
    Rope,
    _check_dir,
    _device,
    _dtype,
    config_from_dict,
    default_model_dir,
    load_config,
    load_tokenizer,
)

ATTENTION = "kvoffload"  # the name of `attention` in transformers' attention-function registry
BRIDGE = "kvoffload_cache"  # the keyword under which a bridge reaches the attention function


@functools.cache
def _transformers():
    """The transformers package, imported on first use, with `attention` registered (and sdpa's masks for it, which
    the model builds for a call without a bridge). A missing package is one line."""
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "the transformers engine needs the transformers package, which is not installed: pip install transformers"
        ) from None
    transformers.AttentionInterface.register(ATTENTION, attention)
    transformers.AttentionMaskInterface.register(ATTENTION, transformers.masking_utils.sdpa_mask)
    return transformers


def available() -> bool:
    """Whether transformers can be imported (evaluate.py checks it before a run with --engine transformers)."""
    try:
        _transformers()
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------- the attention function
def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: query [B, n_heads, T, d], key, value [B, n_kv_heads, T, d]
    (post-RoPE); returns (output [B, T, n_heads, d], None). With a bridge among the keywords (put there by its
    `update`), the cache behind it attends; without one, transformers' sdpa attention does."""
    bridge = kwargs.pop(BRIDGE, None)
    if bridge is None:
        sdpa = _transformers().AttentionInterface()["sdpa"]
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return bridge.attention(module.layer_idx, query, key, value, attention_mask), None


def _hand_layer_input(module, args, kwargs):
    """Forward pre-hook of every attention module: its normalised input x [B, T, dim] and the model's cos, sin go to
    the bridge (kwargs["cache"]), which computes the next layer's query from them when its cache asks (InfiniGen)."""
    bridge = kwargs.get("cache")
    if isinstance(bridge, Bridge):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        bridge.layer_input(module.layer_idx, x, kwargs["position_embeddings"])


def _rotate(x, cos, sin):
    """RoPE with the model's own tables: x [B, H, T, d], cos, sin [B, T, d] (the "rotate_half" layout, model.Rope)."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin[:, None]


# ----------------------------------------------------------------------------- the cache
class Bridge:
    """The transformers Cache that stands for one of our caches (made a subclass of transformers.Cache on first use:
    `_bridge_class`). It holds no K/V itself: `update` hands the new tokens on, and `attend` (called by `attention`)
    runs the cache behind it.

    Behind it is either a given cache (`Engine.__call__`: any kvcache.Cache), or, for
    `policy_cache`, a policy: the prompt goes into a FullCache (full attention, the prompt's queries kept for LRQK),
    and the first use after it builds the policy's cache from it (`cache`). One sequence per policy cache, greedy or
    sampled decoding; beam search and assisted decoding (reorder, crop) are refused.
    """

    def __init__(self, engine, cache=None, policy=None, calibration=None):
        super().__init__(layers=[])  # transformers.Cache, with no layers of its own
        self.engine = engine
        self.policy, self.calibration = policy, calibration
        n_layers = engine.config.n_layers
        if cache is None:
            needs_queries = policy is not None and policy.sparse and policy.select.kind.needs_queries
            cache = kvcache.FullCache(n_layers, keep_queries=needs_queries, arch=engine.config.arch)
        self.inner = cache
        self.built = policy is None or not policy.sparse  # the policy's cache is built (or none is to be)
        self.pos = None  # [T] positions of the current forward's new tokens
        self.asked = {}  # layer -> what its cache asked for besides q, k, v ({"next_query": [B, n_heads, T, d]})

    @property
    def cache(self):
        """The cache that attends: the given one, or the prefill's FullCache until every layer holds the prompt, then
        the policy's, built from it (kvcache.from_prefill; a prompt shorter than the budget keeps full attention)."""
        if not self.built and self.inner.k[-1] is not None:
            self.inner = kvcache.from_prefill(
                self.inner, self.policy, self.engine.rope, calibration=self.calibration
            )
            self.built = True
        return self.inner

    # what a user reads after `generate`: the cache's own accounting
    def budget_line(self) -> str:
        return self.cache.budget_line()

    @property
    def stats(self):
        return self.cache.stats

    @property
    def bytes_fetched(self) -> int:
        return self.cache.bytes_fetched

    def memory(self, exact_bytes=2) -> dict:
        return self.cache.memory(exact_bytes)

    # ------------------------------------------------------------- transformers' side
    def get_seq_length(self, layer_idx=0) -> int:
        return self.cache.seq_len

    def get_mask_sizes(self, query_length, layer_idx=0) -> tuple:
        return self.get_seq_length() + query_length, 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Called by every attention module before its attention function, with its new k, v [B, n_kv_heads, T, d]
        and the attention function's keyword arguments (`kwargs`), where the bridge puts itself."""
        call = kwargs.get("kwargs")
        if call is None:
            raise ValueError(
                f"{type(self.engine.lm).__name__}'s attention does not hand its cache the attention's arguments "
                "(cache.update(..., kwargs=...)): the policy cannot reach its attention"
            )
        if layer_idx == 0:
            self._start(key_states, call.get("position_ids"))
        call[BRIDGE] = self
        return key_states, value_states

    def _start(self, k, position_ids):
        """Layer 0 of a forward: the positions of its T new tokens, and the checks that need the forward."""
        B, _, T, _ = k.shape
        implementation = self.engine.lm.config._attn_implementation
        if implementation != ATTENTION:
            raise ValueError(
                f"the model's attention implementation is {implementation!r}, not {ATTENTION!r}: make the cache "
                "after setting it (hf.policy_cache sets it)"
            )
        if B > 1 and self.policy is not None and self.policy.sparse:
            raise ValueError(
                f"the {self.policy.name} policy holds one sequence (kvcache.from_kv); got {B} rows (several "
                "prompts, or num_beams > 1): generate one prompt at a time, greedy or sampled"
            )
        start = self.cache.seq_len
        limit = self.engine.config.max_positions
        if start + T > limit:
            raise ValueError(
                f"input of {start + T} tokens exceeds the model's {limit} positions: shorten the prompt"
            )
        self.pos = torch.arange(start, start + T, device=k.device)  # [T]
        if position_ids is not None and not bool((position_ids == self.pos).all()):
            raise ValueError(
                "the new tokens are not at the positions that follow the cache (padding?): "
                "a policy cache decodes one unpadded sequence"
            )

    def layer_input(self, layer, x, position_embeddings):
        """From the pre-hook: layer `layer`'s normalised input x [B, T, dim]. When the cache asks for the next layer's
        query (InfiniGen), compute it: the next layer's q_proj (and q_norm) of x, RoPE'd with the model's cos, sin."""
        if layer + 1 < self.engine.config.n_layers and "next_query" in self.cache.asks:
            self.asked[layer] = dict(next_query=self.engine.queries(layer + 1, x, *position_embeddings))

    def attention(self, layer, q, k, v, mask=None):
        """From `attention`: the cache attends the new tokens' q [B, n_heads, T, d], k, v; [B, T, n_heads, d]. The
        model's mask (sdpa's, [B, 1, T, S] bool, or None) is the causal one the cache applies itself unless it
        hides some token from the last new one: padding, which no policy cache reads (refused)."""
        if layer == 0 and isinstance(mask, torch.Tensor) and not bool(mask[..., -1, :].all()):
            raise ValueError(
                "the attention mask hides some tokens (padding?): a policy cache decodes one unpadded sequence"
            )
        out = self.cache.attend(layer, q, k, v, self.pos, **self.asked.pop(layer, {}))  # [B, n_heads, T, d]
        return out.transpose(1, 2)

    def _refuse(self, *args, **kwargs):
        raise ValueError(
            "a policy cache follows one sequence, greedy or sampled: beam search and assisted decoding "
            "(reordered or cropped caches) are not supported"
        )

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _refuse


@functools.cache
def _bridge_class():
    """Bridge over transformers.Cache: the class `generate` and the model's forward see (transformers is imported
    here, on first use)."""
    return type("PolicyCache", (Bridge, _transformers().Cache), {})


# ----------------------------------------------------------------------------- the model
class ModelRope(Rope):
    """model.Rope with the model's own tables: cos, sin from its rotary-embedding module, so that `invert` undoes
    exactly the rotation the model gave its keys, and `apply` rotates rebuilt keys as the model rotates its own.
    (transformers computes the angles in float32, model.Rope in float64: on the default model their cos differ by
    up to 1.1e-4 at 2K positions, enough to move a 4-bit code of a key un-rotated with the other's tables.) Only for
    the RoPE kinds model.Rope applies (model.config_from_dict says which), whose rotation is orthogonal."""

    def __init__(self, config, rotary):
        super().__init__(config)
        self.rotary = rotary  # the model's rotary embedding: (x, position_ids [1, P]) -> cos, sin [1, P, d]

    def tables(self, device, dtype):
        key = (torch.device(device), dtype)
        if key not in self._tables:
            pos = torch.arange(self.max_positions, device=device)[None]  # [1, P]
            cos, sin = self.rotary(torch.zeros(1, device=device, dtype=dtype), pos)  # [1, P, d] each
            half = self.head_dim // 2
            signed = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)  # [P, d], as model.Rope.tables
            self._tables[key] = (cos[0], signed)
        return self._tables[key]


class _NoRope:
    """model.Rope's place for a model whose RoPE kvcache cannot apply: the policies that need it are refused
    (`check`); any other use is one line."""

    def __init__(self, reason):
        self.reason = reason

    def apply(self, x, pos):
        raise ValueError(f"kvcache cannot apply this model's RoPE: {self.reason}")

    invert = apply


class Engine:
    """model.py's interface over a transformers causal LM (`lm`): engine(input_ids, cache, last_only) -> float32
    logits, `config` (model.ModelConfig), `rope` (model.Rope), `embed_tokens`, `layers`, so that model.prefill,
    model.decode, skew.calibration and evaluate.py decode through it as through model.Transformer.

    Making one sets the model's attention implementation to ATTENTION (its sdpa attention when no bridge is given)
    and puts the pre-hook that hands a layer's input to the bridge (`_hand_layer_input`) on every attention module,
    once per model. config: the ModelConfig of the checkpoint (model.load_config), else read from the model's own.
    """

    engine = "transformers"  # skew.cache_key: a calibration fitted by this engine's forward is kept apart

    def __init__(self, lm, config=None):
        name = type(lm).__name__
        if name not in ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {name}: policies run inside {', '.join(ARCHITECTURES)}"
            )
        self.lm = lm
        reason = None
        if config is None:
            config, reason = model_config(lm)
        self.config = config
        self.rope = ModelRope(config, lm.model.rotary_emb) if reason is None else _NoRope(reason)
        self.layers = lm.model.layers
        self.attentions = [layer.self_attn for layer in self.layers]
        self.embed_tokens = lm.get_input_embeddings()
        self.bridge = _bridge_class()  # imports transformers and registers `attention` (on first use)
        if lm.config._attn_implementation != ATTENTION:
            lm.set_attn_implementation(ATTENTION)
        for attn in self.attentions:
            if _hand_layer_input not in attn._forward_pre_hooks.values():
                attn.register_forward_pre_hook(_hand_layer_input, with_kwargs=True)

    def __call__(self, input_ids, cache=None, last_only=False):
        """input_ids [B, T] -> float32 logits [B, T, vocab] ([B, 1, vocab] with last_only), as model.Transformer:
        without a cache a plain causal forward; with one, the T tokens follow its seq_len tokens and every layer's
        attention is `cache.attend(...)`."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be [batch, T], got shape {tuple(input_ids.shape)}: use ids[None] for one sequence"
            )
        if cache is None:
            limit = self.config.max_positions
            if input_ids.shape[1] > limit:
                raise ValueError(
                    f"input of {input_ids.shape[1]} tokens exceeds the model's {limit} positions: shorten the prompt"
                )
            return self.lm(input_ids, use_cache=False).logits.float()
        out = self.lm(
            input_ids, cache=self.bridge(self, cache), use_cache=True, logits_to_keep=int(last_only)
        )
        return out.logits.float()

    def named_parameters(self):
        """The model's weights by name (skew.cache_key reads a sample of each)."""
        return self.lm.named_parameters()

    def queries(self, layer, x, cos, sin):
        """Layer `layer`'s post-RoPE queries [B, n_heads, T, d] of a normalised input x [B, T, dim] (model.py's
        Attention.queries, with this model's modules and its cos, sin [B, T, d])."""
        attn = self.attentions[layer]
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, -1, attn.head_dim)  # [B, T, n_heads, hd]
        if hasattr(attn, "q_norm"):  # Qwen3
            q = attn.q_norm(q)
        return _rotate(q.transpose(1, 2), cos, sin)  # [B, n_heads, T, hd]


def _engine(model) -> Engine:
    return model if isinstance(model, Engine) else Engine(model)


def model_config(lm):
    """(ModelConfig, None) of a transformers model, read by model.config_from_dict from its config as model.py reads
    a checkpoint's config.json; or (ModelConfig without RoPE scaling, the reason) when model.Rope cannot apply its
    RoPE (every other field still read and checked)."""
    c = lm.config.to_dict() | dict(architectures=[type(lm).__name__])
    where = f"the config of the {type(lm).__name__}"
    eos = lm.generation_config.eos_token_id if lm.generation_config is not None else None
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    try:
        return config_from_dict(c, where, eos), None
    except ValueError as err:
        rope = c.get("rope_parameters") or {}
        plain = dict(rope_type="default", rope_theta=c.get("rope_theta", rope.get("rope_theta", 10000.0)))
        config = config_from_dict(c | dict(rope_parameters=plain, rope_scaling=None), where, eos)
        return config, " ".join(str(err).split())  # RoPE was the one thing wrong


def check(engine, policy, calibration=None):
    """Refuse, with one line and before any work, a policy that needs what the model (or the caller) does not give:
    RoPE that model.Rope applies (low-rank keys, keys stored before RoPE), InfiniGen's calibration of this model."""
    if not policy.sparse:
        return
    keys = policy.keys
    if (keys.source == "low_rank" or keys.kv_pre_rope) and isinstance(engine.rope, _NoRope):
        what = "rebuilds its low-rank keys" if keys.source == "low_rank" else "stores its keys before RoPE"
        raise ValueError(
            f"the {policy.name} policy {what} and applies RoPE to them, and kvcache cannot apply this model's RoPE "
            f"({engine.rope.reason})"
        )
    if policy.select.kind.needs_calibration:
        if calibration is None:
            raise ValueError(
                f"the {policy.name} policy needs its calibration of the model: pass "
                "calibration=hf.calibration(model, tokenizer)"
            )
        c = engine.config
        policy.select.kind.check_calibration(
            calibration, policy.name, policy.select.kind_params, c.n_layers, c.head_dim
        )


def policy_cache(model, policy, calibration=None):
    """The transformers Cache that runs `policy` (a policy.Policy) inside `model` (a transformers causal LM of an
    architecture model.py supports, or an Engine): pass it to model.generate(..., cache=) or model(..., cache=).
    The prompt's forward is the prefill (full attention); every later forward decodes through the policy's cache.
    calibration: InfiniGen's (`calibration`). A policy the model cannot run is one line here, before any work."""
    engine = _engine(model)
    check(engine, policy, calibration)
    return engine.bridge(engine, policy=policy, calibration=calibration)


def calibration(model, tokenizer, channels: float = 0.2) -> dict:
    """InfiniGen's calibration of a transformers model (skew.calibration through this engine's forward, cached on
    disk apart from model.py's); tokenizer: anything whose encode(text) gives token ids (model.load_tokenizer's)."""
    return skew.calibration(_engine(model), tokenizer, channels)


def load_model(path=None, dtype=torch.float32, device="cpu", chat_format=None):
    """(Engine, model.Tokenizer) of a checkpoint folder, the model loaded by transformers (AutoModelForCausalLM);
    path None = the default model. The config and the tokenizer are model.py's own (load_config, load_tokenizer),
    so both engines read the same prompt ids and positions: `evaluate.py --engine transformers`."""
    dtype, device = _dtype(dtype), _device(device)
    transformers = _transformers()
    path = default_model_dir() if path is None else _check_dir(path)
    config = load_config(path)
    tokenizer = load_tokenizer(path, config, chat_format)
    lm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return Engine(lm, config), tokenizer
