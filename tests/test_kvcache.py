"""Invariants of the selection policies (kvcache.py) and of offloading (offload.py)."""

import inspect
import sys
import warnings
from pathlib import Path

import pytest
import torch

import experiment
import kvcache
import landmarks
import skew
from kvcache import FullCache, SparseCache, StackedCache, from_kv, from_prefill
from model import ModelConfig, Rope, Transformer
from policy import OUTLIER_SHARE, POLICIES, make_policy, override

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
import lab  # noqa: E402  notebooks/lab.py: the labs' recording cache


def tiny_config(**kw):
    base = dict(
        arch="LlamaForCausalLM",
        vocab_size=97,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=96,
        norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_positions=4096,
        tie_embeddings=False,
        qkv_bias=False,
        qk_norm=False,
        bos_id=None,
        eos_ids=[],
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    prompt = torch.randint(0, 97, (1, 160), generator=torch.Generator().manual_seed(1))  # [1, 160]
    steps = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(2))  # [1, 12]
    return model, prompt, steps


_CALIBRATIONS = {}  # id(model) -> InfiniGen's calibration of it (skew.fit on random tokens)


def calibration(model, channels=0.2):
    key = (id(model), channels)
    if key not in _CALIBRATIONS:
        ids = torch.randint(0, model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(3))
        _CALIBRATIONS[key] = skew.fit(model, ids.tolist(), channels)
    return _CALIBRATIONS[key]


@torch.inference_mode()
def run(model, policy, prompt, steps):
    """Prefill (full attention), build the policy's cache from it, then teacher-forced decode steps one
    token at a time; returns (decode logits [n, vocab], the cache)."""
    full = FullCache(model.config.n_layers, keep_queries=True)
    model(prompt, full, last_only=True)
    cal = (
        calibration(model, policy.select.param("channels"))
        if policy.sparse and policy.select.kind.needs_calibration
        else None
    )
    cache = from_prefill(full, policy, model.rope, calibration=cal) if policy.sparse else full
    return torch.cat([model(steps[:, i : i + 1], cache)[0] for i in range(steps.shape[1])]), cache


def full_logits(model, prompt, steps):
    return run(model, make_policy("full"), prompt, steps)[0]  # [n, vocab]


def whole_middle_budget(T, sink, local, chunk):
    """The budget share that selects every middle token (no fallback to full attention)."""
    return (T - sink - local) // chunk * chunk / T


# Every sparse policy (POLICIES), as it fits the tiny 160-token prompt: each generic test below runs
# over this one list, so a new policy gets all of them by adding one line. The overrides make room: a
# sink and a local window of 4 and 16 tokens, ShadowKV's 48 outlier chunks cut to 2.
CASES = {
    "oracle": {},
    "mean": {},
    "svd": {},
    "shadowkv": dict(outliers=2),
    "quantized": {},
    "paper": {},
    "paper_fast": dict(min_prompt=0),
    "quest": {},
    "arkvale": {},
    "lrqk": {},
    "infinigen": dict(dense_layers=1),  # the tiny model has 2 layers: one dense, one that selects
}
FIT = dict(sink=4, local=16)


def test_every_policy_has_a_case():
    assert set(CASES) == set(POLICIES) - {"full"}


def exact_policy(name, T):
    """The case at full precision (exact K/V, full rank) with a budget that selects the whole middle, so
    it must equal full attention while still running the sparse path."""
    p = override(
        make_policy(name, **FIT, **CASES[name]),
        kv_bits=None,
        kv_group="head",
        kv_pre_rope=False,
        sink=4,
        local=16,
    )
    if p.keys.source == "low_rank":
        p = override(p, rank=32)  # full rank: 2 KV heads x 16 channels
    n_out, c = p.exact.outliers, p.select.chunk_size  # whole chunks, kept exact besides the selection
    half = -0.5 if p.select.round_up else 0.5  # half a token off the whole middle, whichever way it rounds
    return override(p, budget=(whole_middle_budget(T, 4, 16, c) * T - n_out * c + half) / T)


@pytest.mark.parametrize("name", CASES)
def test_full_budget_equals_full_attention(tiny, name):
    model, prompt, steps = tiny
    policy = exact_policy(name, prompt.shape[1])
    got, cache = run(model, policy, prompt, steps)
    assert isinstance(cache, SparseCache), "the sparse path must run, not the short-prompt fallback"
    assert (
        cache.split.selected + cache.split.outlier_tokens == cache.split.n_chunks * policy.select.chunk_size
    )
    assert (got - full_logits(model, prompt, steps)).abs().max() < 1e-5


@pytest.mark.parametrize(
    "name,kw",
    [
        ("mean", dict(chunk_size=1)),
        ("mean", dict(chunk_size=4)),
        ("quantized", dict(landmark_bits="1", residual=4)),
        ("quest", dict(chunk_size=4)),
    ],
)
def test_full_budget_equals_full_attention_variants(tiny, name, kw):
    model, prompt, steps = tiny
    T, c = prompt.shape[1], kw.get("chunk_size", 1)
    got, cache = run(
        model, make_policy(name, budget=whole_middle_budget(T, 4, 16, c), **FIT, **kw), prompt, steps
    )
    assert isinstance(cache, SparseCache) and cache.split.selected == cache.split.n_chunks * c
    assert (got - full_logits(model, prompt, steps)).abs().max() < 1e-5


@pytest.mark.parametrize("name", CASES)
def test_offloaded_path_equals_on_device_every_policy(tiny, name):
    model, prompt, steps = tiny
    got_a, a = run(model, make_policy(name, budget=0.1, **FIT, **CASES[name], offload=True), prompt, steps)
    got_b, b = run(model, make_policy(name, budget=0.1, **FIT, **CASES[name], offload=False), prompt, steps)
    assert torch.equal(got_a, got_b)
    assert isinstance(a, SparseCache) and a.bytes_fetched > 0 and b.bytes_fetched == 0
    assert a.memory()["offloaded"] > 0 and b.memory()["offloaded"] == 0


@pytest.mark.parametrize("name", CASES)
def test_short_prompt_falls_back_every_policy(tiny, name):
    model, prompt, steps = tiny
    short = prompt[:, :40]
    with pytest.warns(UserWarning, match="shorter than the"):
        got, cache = run(model, make_policy(name, budget=1.0, **FIT, **CASES[name]), short, steps)
    assert isinstance(cache, FullCache) and cache.policy.name == name
    assert torch.equal(got, full_logits(model, short, steps))


@pytest.mark.parametrize("name", CASES)
def test_stacked_cache_matches_separate_run_every_policy(tiny, name):
    model, prompt, steps = tiny
    policies = [make_policy("full"), make_policy(name, budget=0.1, **FIT, **CASES[name])]
    full = FullCache(model.config.n_layers, keep_queries=True)
    cal = calibration(model) if policies[1].select.kind.needs_calibration else None
    with torch.inference_mode():
        model(prompt, full, last_only=True)
        stacked = StackedCache([from_prefill(full, p, model.rope, calibration=cal) for p in policies])
        batch = torch.cat(
            [model(steps[:, i : i + 1].expand(2, -1), stacked)[:, 0] for i in range(steps.shape[1])]
        ).view(steps.shape[1], 2, -1)  # [n, 2, vocab]
    for j, p in enumerate(policies):
        alone, _ = run(model, p, prompt, steps)
        assert (batch[:, j] - alone).abs().max() < 1e-4


def test_quest_chunk1_selects_the_oracle_tokens(tiny):
    """With chunk 1 the min and max of a chunk are the key itself, so Quest's bound is q . k: the oracle."""
    model, prompt, steps = tiny
    logits, caches = zip(
        *(
            run(model, make_policy(n, budget=0.1, chunk_size=1, **FIT), prompt, steps)
            for n in ("oracle", "quest")
        )
    )
    for layer in range(model.config.n_layers):
        assert torch.equal(caches[0].last_selected[layer], caches[1].last_selected[layer])
    assert (logits[0] - logits[1]).abs().max() < 1e-5


def test_quest_bound_is_an_upper_bound():

    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 32, 8, generator=g)  # [H, M, d]
    q = torch.randn(2, 3, 1, 8, generator=g)  # [H, G, Tq, d]
    bounds = landmarks.QuestBounds.build(k, 4).logits(q)  # [H, G, 1, 8]
    exact = landmarks.landmark_logits(q, k).view(2, 3, 1, 8, 4).amax(-1)  # best q.k/sqrt(d) per chunk
    assert (bounds >= exact - 1e-6).all() and (bounds > exact + 1e-3).any()


def test_outliers_leave_before_the_softmax():
    """A hand case where taking ShadowKV's outlier landmark out before or after the softmax picks a
    different chunk. Head 0 likes the outlier (landmark 0) and then landmark 1; head 1 likes landmark 2.
    Outlier inside head 0's softmax: landmark 1 gets ~0 there, and head 1's landmark 2 wins the max over
    the group. Outlier out first (ShadowKV's accuracy class): landmark 1 takes 0.91 of head 0's softmax
    and beats landmark 2's 0.86 from head 1."""

    means = torch.tensor([[[20.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])  # [H=1, N=4, d=2]
    removed = torch.tensor([[True, False, False, False]])  # [H, N] landmark 0 is the outlier
    marks = landmarks.ChunkMeans(means, torch.ones(1, 4), removed=removed)
    q = (
        torch.tensor([[[[1.0, 0.0]], [[0.0, 2.5]]]]) * 2**0.5
    )  # [H, G=2, Tq=1, d]; x sqrt(d) undoes the scaling
    before = landmarks.score(q, marks)  # [1, 4]
    inside = landmarks.scores_from_logits(landmarks.landmark_logits(q, means)).masked_fill(
        removed, float("-inf")
    )
    assert int(before.argmax()) == 1 and int(inside.argmax()) == 2


def test_paper_kv_pre_rope_token_group_round_trip(tiny):
    """The paper's K/V: all kv_heads x head_dim channels of a token in one group, keys quantized before
    RoPE. The error against full attention falls as the bits rise, and is small at the paper's 4 bits."""
    model, prompt, steps = tiny
    T = prompt.shape[1]
    ref = full_logits(model, prompt, steps)
    err = {}
    for bits in ("2", "4", "8"):
        policy = make_policy("paper", budget=whole_middle_budget(T, 4, 16, 1), **FIT, kv_bits=bits)
        got, cache = run(model, policy, prompt, steps)
        err[bits] = (got - ref).abs().max().item()
        assert cache.store.get(0, "k").codes.shape[:2] == (1, T - 20)  # one row per token, all heads
    assert err["8"] < err["4"] < err["2"] < 0.1 * ref.abs().max()


def test_sparse_budget_differs_from_full(tiny):
    """The check above could pass by accident if selection were ignored: a small budget must change logits."""
    model, prompt, steps = tiny
    got, _ = run(model, make_policy("oracle", budget=0.05, sink=2, local=4), prompt, steps)
    assert (got - full_logits(model, prompt, steps)).abs().max() > 1e-3


def test_oracle_recall_is_one_and_mean_chunk1_equals_oracle(tiny):
    model, prompt, steps = tiny
    caches = {}
    for name, kw in [("oracle", {}), ("mean", dict(chunk_size=1)), ("mean", dict(chunk_size=8))]:
        policy = make_policy(name, budget=0.1, sink=4, local=8, track=True, **kw)
        caches[f"{name}{kw}"] = run(model, policy, prompt, steps)
    (lo, co), (l1, c1), (_, c8) = caches.values()
    assert co.stats.summary()["oracle_recall"] == 1.0
    assert torch.equal(lo, l1)
    for layer in range(model.config.n_layers):
        assert torch.equal(co.last_selected[layer], c1.last_selected[layer])
    assert c8.stats.summary()["oracle_recall"] < 1.0
    # attention mass: the oracle's selection captures at least as much exact weight as chunk-8 means
    assert co.stats.summary()["attention_mass"] >= c8.stats.summary()["attention_mass"] - 1e-6
    assert 0 < c8.stats.summary()["attention_mass"] <= 1


def test_svd_full_rank_rebuilds_exact_keys():
    torch.manual_seed(0)
    k = torch.randn(3, 50, 16)  # [H, M, d]
    u, sv = kvcache.low_rank_keys(k, 48)
    idx = torch.arange(50).expand(3, -1)
    assert (kvcache.rebuild_keys(u, sv, idx, 3, 16) - k).abs().max() < 1e-4
    u, sv = kvcache.low_rank_keys(k, 8)  # low rank: a real, bounded error
    err = (kvcache.rebuild_keys(u, sv, idx, 3, 16) - k).norm() / k.norm()
    assert 0.1 < err < 1


def test_shadowkv_tracks_key_error_and_outliers(tiny):
    model, prompt, steps = tiny
    _, cache = run(
        model,
        make_policy("shadowkv", budget=0.1, sink=4, local=8, rank=4, outliers=2, track=True),
        prompt,
        steps,
    )
    s = cache.stats.summary()
    assert s["key_error"] > 0.01
    removed = cache.layers[0].marks.removed  # [H, N]
    assert removed.sum(1).tolist() == [2, 2]  # two outlier chunks per KV head, never selected
    assert "+ 16 outliers" in cache.budget_line()
    sel_chunks = (cache.last_selected[0] - 4) // 8  # [H, S]
    for h in range(2):
        assert not removed[h, sel_chunks[h]].any()


def test_offloaded_kv_quantized(tiny):
    """kv_bits: the offloaded K/V are stored and fetched packed (bytes exact) and dequantized on the
    device; the logit error against full attention falls as the bits rise."""
    model, prompt, steps = tiny
    T, n = prompt.shape[1], steps.shape[1]
    ref = full_logits(model, prompt, steps)
    row_bytes = {None: 16 * 4, "8": 16 + 2, "4": 8 + 2, "2": 4 + 2, "int4": 8 + 2 + 2}  # 16 channels per row
    err = {}
    for bits, per_row in row_bytes.items():
        for name, kw, stored in (("oracle", {}, 2), ("svd", dict(rank=32), 1)):  # svd offloads only V
            policy = make_policy(
                name, sink=4, local=16, budget=whole_middle_budget(T, 4, 16, 1), kv_bits=bits, **kw
            )
            got, cache = run(model, policy, prompt, steps)
            offloaded = 2 * stored * 2 * (T - 20) * per_row  # layers x (K, V) x KV heads x middle rows
            assert cache.memory(exact_bytes=None)["offloaded"] == offloaded, (name, bits)
            assert cache.bytes_fetched == n * offloaded  # every middle row, at each of n steps
            err[name, bits] = (got - ref).abs().max().item()
    for name in ("oracle", "svd"):
        assert (
            err[name, None] < 1e-5 < err[name, "8"] < err[name, "4"] < err[name, "2"] < 0.05 * ref.abs().max()
        )
    assert make_policy("oracle", kv_bits="4").label() == "oracle kv4"


def test_bytes_moved_per_step(tiny):
    model, prompt, steps = tiny
    _, cache = run(
        model, make_policy("mean", chunk_size=4, budget=0.1, sink=4, local=8), prompt, steps[:, :1]
    )
    sel = cache.split.selected  # 16 tokens, K and V, 2 KV heads x 16 channels, float32, 2 layers
    assert cache.bytes_fetched == 2 * 2 * sel * 2 * 16 * 4


def test_memory_accounting_llama8b_shapes():
    """Llama-3.1-8B shapes (8 KV heads x 128 = 1024 channels), bf16: PAPER.md "Memory accounting"."""
    cfg = tiny_config(n_layers=1, n_heads=32, n_kv_heads=8, head_dim=128, rope_theta=500000.0)
    rope, T = Rope(cfg), 4096
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 8, T, 128, generator=g).bfloat16()
    full = from_kv([k], [k.clone()])
    frac = {}
    for name, kw in [
        ("shadowkv", dict(rank=160, outliers=0, sink=0, local=0)),
        ("quantized", dict(sink=0, local=0)),
    ]:
        cache = from_prefill(full, make_policy(name, **kw), rope)
        frac[name] = cache.memory()["device_fraction"]
    # U (160 x 16 bits) + chunk-8 landmarks (16 C / 8 bits) over 32 C bits of bf16 KV = 14.06%,
    # plus the shared S V^T [160, 1024], which a 4K prompt does not amortise yet
    sv_share = 160 * 1024 * 16 / (T * 32 * 1024)
    assert frac["shadowkv"] == pytest.approx((160 * 16 + 16 * 1024 / 8) / (32 * 1024) + sv_share, abs=0.002)
    # 2 bits per value + one 16-bit scale per group of 128 = 6.64%
    assert frac["quantized"] == pytest.approx((2 * 1024 + 16 * 8) / (32 * 1024), abs=0.002)
    assert full.memory()["device_fraction"] == pytest.approx(1.0)


def test_from_prefill_needs_a_prefilled_cache(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="from_prefill: the cache holds no prompt K/V"):
        from_prefill(FullCache(model.config.n_layers), make_policy("oracle"), model.rope)


def test_sparse_policy_rejects_batches(tiny):
    model, prompt, _ = tiny
    full = FullCache(model.config.n_layers)
    with torch.inference_mode():
        model(prompt.expand(2, -1), full)
    with pytest.raises(ValueError, match="one sequence"):
        from_kv(full.k, full.v, make_policy("oracle", budget=0.1), model.rope)


def test_budget_line(tiny):
    model, prompt, _ = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, cache = run(model, make_policy("quantized", budget=0.1, sink=4, local=8), prompt, prompt[:, :1])
    assert cache.budget_line() == "budget = 4 sink + 8 local + 16 selected of 160 tokens"


def test_caches_sharing_a_prefill_do_not_write_into_each_other(tiny):
    """from_prefill shares the prompt K/V as views; each cache must grow into its own buffer."""
    model, prompt, steps = tiny
    with torch.inference_mode():
        a = FullCache(model.config.n_layers)
        model(prompt, a, last_only=True)
        b = from_prefill(a, make_policy("full"), model.rope)
        for i in range(4):  # different tokens into the two caches, interleaved
            model(steps[:, i : i + 1], a)
            got_b = model(steps[:, 11 - i : 12 - i], b)[0]
    ref = full_logits(model, prompt, steps.flip(1)[:, :4])
    assert torch.equal(got_b, ref[-1:])


@pytest.fixture(scope="module")
def smollm():
    from model import load_model

    return load_model()


@pytest.mark.slow
def test_quantized_beats_shadowkv_on_real_model(smollm):
    """The paper's claim on a small fixed case: the default model, a generated 1K-token Text2JSON
    prompt, 3.125% budget, 24 steps teacher-forced on the full-attention output (ShadowKV's outliers
    scaled to the short prompt, as in the default run). 2-bit token-level
    landmarks stay closer to full attention (KL of the next-token distribution) and recall more of
    the oracle's tokens than ShadowKV."""
    import text2json

    model, tok = smollm
    sample = text2json.generate(1, 1024, tok, seed=0)[0]
    ids = tok.chat([{"role": "user", "content": sample["problem"]}])
    policies = [
        make_policy("quantized", track=True),
        make_policy("shadowkv", outliers=OUTLIER_SHARE, track=True),
    ]  # the default run's scaling
    with torch.inference_mode():
        full = FullCache(model.config.n_layers)
        token = int(model(torch.tensor([ids]), full, last_only=True)[0, -1].argmax())
        stacked = StackedCache([full] + [from_prefill(full, p, model.rope) for p in policies])
        kl = torch.zeros(2)
        for _ in range(24):
            logp = torch.log_softmax(model(torch.tensor([[token]] * 3), stacked)[:, -1], dim=-1)  # [3, vocab]
            kl += (logp[0].exp() * (logp[0] - logp[1:])).sum(-1)
            token = int(logp[0].argmax())
    quantized, shadowkv = stacked.caches[1:]
    assert kl[0] < kl[1]
    assert quantized.stats.summary()["oracle_recall"] > shadowkv.stats.summary()["oracle_recall"]


def test_shadowkv_attention_mass_counts_outliers_once():
    """Every key 0: attention is uniform over the 32 prompt tokens and the new one. ShadowKV with a local
    window of 8, one outlier chunk (8 tokens) and 8 selected tokens attends 8 + 8 + 8 + 1 = 25 of the
    33, so the mass is 25/33. (The outlier tokens are middle tokens that also sit among the exact
    tokens: counted twice, the mass read (25 + 8) / (33 + 8).)"""
    cfg = tiny_config(n_layers=1, dim=8, n_heads=1, n_kv_heads=1, head_dim=8)
    g = torch.Generator().manual_seed(0)
    k, v = torch.zeros(1, 1, 32, 8), torch.randn(1, 1, 32, 8, generator=g)  # [1, H, T, d]
    policy = make_policy("shadowkv", local=8, budget=0.25, outliers=1, track=True)
    cache = from_kv([k], [v], policy, Rope(cfg))
    q = torch.randn(1, 1, 1, 8, generator=g)  # [1, n_heads, 1, d]
    cache.attend(0, q, torch.zeros(1, 1, 1, 8), torch.randn(1, 1, 1, 8, generator=g), torch.tensor([32]))
    assert cache.split.line() == "budget = 0 sink + 8 local + 8 selected (+ 8 outliers) of 32 tokens"
    assert cache.stats.summary()["attention_mass"] == pytest.approx(25 / 33, abs=1e-6)


def test_a_tracked_oracle_selects_as_an_untracked_one():
    """A tracked oracle takes its selection from the tracking pass (SparseCache._exact_pass) instead of
    scoring twice: the same tokens and the same outputs, bit for bit, as the oracle that does not track."""
    cfg = tiny_config(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, head_dim=8)
    g = torch.Generator().manual_seed(3)
    k = [torch.randn(1, 2, 96, 8, generator=g) for _ in range(2)]  # [1, H, T, d] per layer
    v = [torch.randn(1, 2, 96, 8, generator=g) for _ in range(2)]
    caches = [
        from_kv(k, v, make_policy("oracle", local=8, budget=0.125, track=t), Rope(cfg)) for t in (False, True)
    ]
    for step in range(3):
        q, k1, v1 = (torch.randn(1, h, 1, 8, generator=g) for h in (4, 2, 2))  # [1, heads, 1, d]
        outs = [[c.attend(layer, q, k1, v1, torch.tensor([96 + step])) for layer in range(2)] for c in caches]
        for layer in range(2):
            assert torch.equal(caches[0].last_selected[layer], caches[1].last_selected[layer])
            assert torch.equal(outs[0][layer], outs[1][layer])
    assert caches[1].stats.summary()["oracle_recall"] == 1.0


@pytest.mark.parametrize("rule", ["softmax_max", "mean_query"])
def test_a_removed_landmark_is_never_selected(rule):
    """Landmark 1's logit is so large that every other probability underflows to 0: the tie at 0 must not
    be broken in favour of landmark 0, which is removed (an outlier chunk, already attended exactly)."""

    means = torch.zeros(1, 6, 2)  # [H=1, N=6, d=2]
    means[0, 1, 0] = 1000.0
    removed = torch.zeros(1, 6, dtype=torch.bool)
    removed[0, 0] = True
    marks = landmarks.ChunkMeans(means, torch.ones(1, 6), removed=removed)
    q = torch.tensor([[[[1.0, 0.0]]]])  # [H, G=1, Tq=1, d]
    scores = landmarks.score(q, marks, rule)  # [1, 6]
    assert landmarks.select_topk(scores, 3).tolist() == [[1, 2, 3]]


# ------------------------------------------------------------------------ the other baselines' own rules
def test_arkvale_page_of_identical_keys_scores_q_dot_k():
    """A page whose keys are all the same key has a zero half-width: its box is the key, its logit q.k/sqrt(d)."""
    g = torch.Generator().manual_seed(0)
    key = torch.randn(2, 1, 1, 8, generator=g)  # [H, N, 1, d]
    k = key.expand(2, 3, 4, 8).reshape(2, 12, 8)  # [H, M=12, d]: 3 pages of 4 identical keys
    marks = landmarks.PageCuboids.build(k, 4)
    assert torch.equal(marks.upper, marks.lower) and torch.allclose(marks.upper, key[:, :, 0].expand(2, 3, 8))
    q = torch.randn(2, 3, 1, 8, generator=g)  # [H, G, Tq, d]
    assert torch.allclose(marks.logits(q), landmarks.landmark_logits(q, key[:, :, 0]).expand(-1, -1, -1, 3))


def test_arkvale_half_width_is_the_mean_distance_to_the_centre():
    k = torch.tensor([[[0.0, 1.0], [4.0, 1.0], [1.0, 3.0], [1.0, 1.0]]])  # [H=1, M=4, d=2], one page
    marks = landmarks.PageCuboids.build(k, 4)
    # centre (2, 2); mean |k - centre| = (2+2+1+1)/4 = 1.5 and (1+1+1+1)/4 = 1
    assert marks.upper.tolist() == [[[3.5, 3.0]]] and marks.lower.tolist() == [[[0.5, 1.0]]]


def test_arkvale_pages_of_one_token_select_the_group_mean_top_k(tiny):
    """With pages of 1 token ArkVale's score is the mean over the group of q.k: what exact top-k with the
    same mean-over-the-group rule selects (the oracle with score_rule 'dot')."""
    model, prompt, steps = tiny
    kw = dict(budget=0.1, chunk_size=1, sink=4, local=16, score_rule="dot")
    _, ark = run(model, make_policy("arkvale", **kw), prompt, steps)
    _, oracle = run(model, make_policy("oracle", **kw), prompt, steps)
    for layer in range(model.config.n_layers):
        assert torch.equal(ark.last_selected[layer], oracle.last_selected[layer])


def per_query_head_top_k(q, k_mid, n):
    """Each query head's exact top-n middle rows by q.k: q [H, G, 1, d], k_mid [H, M, d] -> [H*G, n]."""
    H, G, _, d = q.shape
    scores = (q.reshape(H, G, d) @ k_mid.transpose(1, 2)).reshape(H * G, -1)  # [P, M]
    return landmarks.select_topk(scores, n)


def synthetic_prefill(T=96, H=2, G=3, d=16, seed=0):
    """Random post-RoPE prompt Q, K, V of one layer with a few strong key channels, like real keys."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 3.0, d)
    q = torch.randn(1, H * G, T, d, generator=g) * scale  # [1, n_heads, T, d]
    k = torch.randn(1, H, T, d, generator=g) * scale  # [1, H, T, d]
    v = torch.randn(1, H, T, d, generator=g)
    return q, k, v


def test_lrqk_full_rank_converged_selects_each_query_heads_exact_top_k(monkeypatch):
    """Rank = head_dim and the alternating solves run to convergence: the factorisation is exact (A_Q A_K^T
    = Q K^T), so a decode query's coordinates give q.k for every token, and each query head selects its own
    exact top-k."""
    monkeypatch.setattr(landmarks, "LRQK_TOL", 0.0)  # no early stop: converge
    cfg = tiny_config(n_layers=1, n_heads=6, n_kv_heads=2, head_dim=16)
    q, k, v = synthetic_prefill()
    policy = make_policy("lrqk", qk_rank=1.0, iterations=60, budget=0.25, local=8)
    cache = from_kv([k], [v], policy, Rope(cfg), q=[q])
    g = torch.Generator().manual_seed(5)
    q_new = torch.randn(1, 6, 1, 16, generator=g) * torch.linspace(0.3, 3.0, 16)  # [1, n_heads, 1, d]
    cache.attend(0, q_new, torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g), None)
    k_mid = k[0, :, cache.split.middle]  # [H, M, d]
    want = per_query_head_top_k(q_new[0].view(2, 3, 1, 16), k_mid, cache.split.selected) + cache.split.sink
    assert torch.equal(cache.last_selected[0], want)


def test_lrqk_low_rank_is_not_exact():
    """The check above can fail: at rank 2 of 16 the selection differs from the exact top-k somewhere."""
    cfg = tiny_config(n_layers=1, n_heads=6, n_kv_heads=2, head_dim=16)
    q, k, v = synthetic_prefill()
    cache = from_kv([k], [v], make_policy("lrqk", qk_rank=2, budget=0.25, local=8), Rope(cfg), q=[q])
    g = torch.Generator().manual_seed(5)
    q_new = torch.randn(1, 6, 1, 16, generator=g) * torch.linspace(0.3, 3.0, 16)
    cache.attend(0, q_new, torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g), None)
    want = per_query_head_top_k(q_new[0].view(2, 3, 1, 16), k[0, :, cache.split.middle], cache.split.selected)
    assert not torch.equal(cache.last_selected[0], want + cache.split.sink)


def test_infinigen_every_channel_and_its_own_query_selects_each_query_heads_exact_top_k():
    """Skews are orthogonal, so with every channel kept (qA).(kA) = q.k: scored with the layer's own query,
    each query head selects its exact top-k. With 20% + 20% of the channels it does not, somewhere."""
    cfg = tiny_config(n_layers=1, n_heads=6, n_kv_heads=2, head_dim=16)
    q, k, v = synthetic_prefill()
    skews = torch.linalg.qr(
        torch.randn(1, 6, 16, 16, generator=torch.Generator().manual_seed(7))
    ).Q  # orthogonal
    q_now = torch.randn(2, 3, 1, 16, generator=torch.Generator().manual_seed(8))  # [H, G, 1, d]
    got = {}
    for channels, mask in ((1.0, torch.ones(1, 6, 16, dtype=torch.bool)), (0.2, torch.rand(1, 6, 16) < 0.4)):
        policy = make_policy("infinigen", channels=channels, dense_layers=0, budget=0.25, local=8)
        cache = from_kv(
            [k], [v], policy, Rope(cfg), calibration=dict(skew=skews, mask=mask, channels=channels)
        )
        got[channels] = cache.select(0, q_now)  # [P, S]
    want = per_query_head_top_k(q_now, k[0, :, cache.split.middle], cache.split.selected)
    assert torch.equal(got[1.0], want) and not torch.equal(got[0.2], want)


def test_infinigen_calibration_of_another_model_is_refused():
    cfg = tiny_config(n_layers=1, n_heads=6, n_kv_heads=2, head_dim=16)
    q, k, v = synthetic_prefill()
    other = dict(skew=torch.eye(8).expand(3, 6, 8, 8), mask=torch.ones(3, 6, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="the calibration is of a model with 3 layers and head_dim 8") as e:
        from_kv([k], [v], make_policy("infinigen", dense_layers=0), Rope(cfg), calibration=other)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="needs its calibration"):
        from_kv([k], [v], make_policy("infinigen", dense_layers=0), Rope(cfg))
    with pytest.raises(ValueError, match="prefill's queries"):
        from_kv([k], [v], make_policy("lrqk"), Rope(cfg))


def test_resident_rows_are_hits_and_only_misses_are_fetched(tiny):
    """ArkVale keeps the pages of the last step on the device: a step that selects the same pages again
    fetches nothing, and the results equal fetching every page at every step."""
    model, prompt, steps = tiny
    kw = dict(budget=0.1, chunk_size=4, **FIT)
    same = torch.full_like(steps, 7)  # the same token at every step: mostly the same pages
    got_r, resident = run(model, make_policy("arkvale", **kw), prompt, same)
    got_f, refetch = run(model, make_policy("arkvale", **kw, resident=False), prompt, same)
    assert torch.equal(got_r, got_f)
    hits = resident.stats.hits / resident.stats.selected
    assert 0.5 < hits < 1 and resident.bytes_fetched < (1 - hits + 1e-9) * refetch.bytes_fetched * 1.0001
    # bytes: exactly the misses, K and V, 16 channels of float32 each
    assert resident.bytes_fetched == (resident.stats.selected - resident.stats.hits) * 2 * 16 * 4
    assert resident.stats.summary()["hit_rate"] == pytest.approx(hits)
    assert resident.memory()["resident_fraction"] > 0 and refetch.memory()["resident_fraction"] == 0


def test_lrqk_rank_above_head_dim_is_refused_at_build():
    cfg = tiny_config(n_layers=1, n_heads=6, n_kv_heads=2, head_dim=16)
    q, k, v = synthetic_prefill()
    with pytest.raises(ValueError, match="qk_rank 17 gives rank 17: it must be 1 to head_dim = 16"):
        from_kv([k], [v], make_policy("lrqk", qk_rank=17), Rope(cfg), q=[q])


# --------------------------------------------------------------------------------- the teacher-forced pass
NEAR_TIE = 1e-6  # relative gap between the k-th and (k+1)-th scores under which two paths may pick apart


@torch.inference_mode()
def loop_and_pass(model, policy, prompt, steps, monkeypatch):
    """The same policy fed the same tokens through the decode loop (one token per forward) and through
    the teacher-forced pass (one forward): per path its logits [n, vocab], its cache, the selection of
    every step and sparse layer ({(step, layer): [P, S]}) and, for an untracked policy (whose only
    top-k calls are its selections), the scores each selection was made from ({(step, layer): [P, N]})."""
    recorded = []
    real = landmarks.select_topk
    monkeypatch.setattr(landmarks, "select_topk", lambda s, k: recorded.append((s, k)) or real(s, k))
    caches, logits, picks, scores = {}, {}, {}, {}
    n, n_layers = steps.shape[1], model.config.n_layers
    for path in ("loop", "pass"):
        full = FullCache(n_layers, keep_queries=True)
        model(prompt, full, last_only=True)
        cal = (
            calibration(model, policy.select.param("channels"))
            if policy.select.kind.needs_calibration
            else None
        )
        cache = from_prefill(full, policy, model.rope, calibration=cal)
        sparse = [layer for layer in range(n_layers) if cache.layers[layer].marks is not None]
        recorded.clear()  # the outlier chunks of the build are not a selection of a step
        if path == "loop":
            out = []
            for i in range(n):
                out.append(model(steps[:, i : i + 1], cache)[0])  # [1, vocab]
                picks.setdefault(path, {}).update({(i, j): cache.last_selected[j] for j in sparse})
            logits[path] = torch.cat(out)  # [n, vocab]
            per_call = [s for s, _ in recorded]  # [P, N] a step and a layer, in that order
        else:
            logits[path] = model(steps, kvcache.TeacherForced(cache))[0]  # [n, vocab]
            picks[path] = {(i, j): cache.last_selected[j][:, i] for i in range(n) for j in sparse}
            per_call = forced_scores(recorded, n, len(sparse)) if not policy.track else []
        if not policy.track:  # (a tracked policy's top-k calls are the oracle's too)
            scores[path] = dict(zip(picks[path], per_call, strict=True))  # [P, N] a step and a layer
        caches[path] = cache
    return logits, caches, picks, scores, recorded[0][1] if recorded else None


def forced_scores(recorded, n, layers):
    """The scores of a teacher-forced block's top-k calls, [P, N] per position and layer in the loop's
    order (step after step, layer after layer): a layer's positions selecting at once ([P * n, N] a layer),
    or one after the other (a stateful kind: [P, N] a position, layer after layer)."""
    if len(recorded) == layers:
        per_layer = [s.view(-1, n, s.shape[-1]) for s, _ in recorded]  # [P, n, N]
    else:
        per_layer = [torch.stack([s for s, _ in recorded[j * n : (j + 1) * n]], 1) for j in range(layers)]
    return [s[:, i] for i in range(n) for s in per_layer]


def near_ties(scores, k):
    """[P] whether the k-th and (k+1)-th best scores of each row of scores [P, N] tie within NEAR_TIE."""
    top = scores.topk(min(k + 1, scores.shape[1]), dim=1).values  # [P, k + 1]
    if top.shape[1] <= k:
        return torch.zeros(scores.shape[0], dtype=torch.bool)
    gap = top[:, k - 1] - top[:, k]
    return gap <= NEAR_TIE * top[:, k - 1].abs().clamp(min=1e-30)


@pytest.mark.parametrize("name", CASES)
def test_teacher_forced_pass_equals_the_decode_loop_every_policy(tiny, name, monkeypatch):
    """The teacher-forced pass (every answer position selecting on its own, in one forward) and the decode
    loop (one token per step) of the same policy on the same tokens: the same rows selected at every
    position and layer but where the k-th and (k+1)-th scores tie within NEAR_TIE (counted: those must be
    the only differences), logits within 1e-4, the same bytes fetched, and (tracked) the same statistics
    within 1e-4."""
    model, prompt, steps = tiny
    policy = make_policy(name, budget=0.1, **FIT, **CASES[name])
    logits, caches, picks, scores, k = loop_and_pass(model, policy, prompt, steps, monkeypatch)
    assert len(picks["loop"]) == len(picks["pass"]) == len(scores["loop"]) == len(scores["pass"]) > 0
    differ, ties = 0, 0
    for key, want in picks["loop"].items():
        tied = near_ties(scores["loop"][key], k) | near_ties(scores["pass"][key], k)  # [P]
        ties += int(tied.sum())
        apart = (want != picks["pass"][key]).any(dim=1)  # [P] the heads whose selections differ
        differ += int(apart.sum())
        assert not (apart & ~tied).any(), f"{name}: step {key[0]}, layer {key[1]}: a selection differs untied"
    print(f"{name}: {differ} selections differ, at {ties} near ties")
    assert differ <= ties  # the allowed differences, counted
    assert (logits["loop"] - logits["pass"]).abs().max() < 1e-4
    if not differ:  # the same rows fetched (resident ones: the same hits and misses)
        assert caches["pass"].bytes_fetched == caches["loop"].bytes_fetched > 0
        assert caches["pass"].stats.hits == caches["loop"].stats.hits
    assert caches["pass"].memory() == caches["loop"].memory()  # the resident rows the last position left

    _, caches, _, _, _ = loop_and_pass(model, override(policy, track=True), prompt, steps, monkeypatch)
    loop, forced = (caches[p].stats.summary() for p in ("loop", "pass"))
    for stat in ("oracle_recall", "attention_mass", "key_error", "landmark_error"):
        assert forced[stat] == pytest.approx(loop[stat], abs=1e-4), stat
    assert forced["recall_per_layer"] == pytest.approx(loop["recall_per_layer"], abs=1e-4)
    assert forced["mass_per_layer"] == pytest.approx(loop["mass_per_layer"], abs=1e-4)
    assert torch.equal(caches["pass"].stats.steps, caches["loop"].stats.steps)


def test_teacher_forced_pass_in_blocks_equals_one_block(tiny):
    """Feeding the answer in blocks of positions (experiment.forced_block bounds memory) changes nothing
    but the last bits: a block sees the answer tokens of the blocks before it, and resident rows carry
    over from one block to the next."""
    model, prompt, steps = tiny
    for name in ("shadowkv", "arkvale", "paper"):
        policy = make_policy(name, budget=0.1, **FIT, **CASES[name], track=True)
        got = {}
        for block in (steps.shape[1], 5):
            full = FullCache(model.config.n_layers)
            with torch.inference_mode():
                model(prompt, full, last_only=True)
                cache = kvcache.TeacherForced(from_prefill(full, policy, model.rope))
                got[block] = (
                    torch.cat(
                        [model(steps[:, a : a + block], cache)[0] for a in range(0, steps.shape[1], block)]
                    ),
                    cache.cache.stats.summary(),
                    cache.cache.bytes_fetched,
                )
        (one, s1, b1), (many, s2, b2) = got.values()
        assert (one - many).abs().max() < 1e-4
        assert s1["oracle_recall"] == pytest.approx(s2["oracle_recall"], abs=1e-6) and b1 == b2
        assert s1["hit_rate"] == s2["hit_rate"]


def test_lrqk_selects_position_after_position_inside_the_pass(tiny, monkeypatch):
    """LRQK fits each new query to the rows the last step left (a stateful kind): inside a teacher-forced
    block its positions select one after the other, each step of its factors in order (one LowRankQK.step
    per position and layer, as the decode loop takes), and resident hits are counted per position."""
    model, prompt, steps = tiny
    policy = make_policy("lrqk", budget=0.1, **FIT)
    assert policy.select.kind.stateful and not make_policy("arkvale").select.kind.stateful
    calls = []
    real = landmarks.LowRankQK.step
    monkeypatch.setattr(
        landmarks.LowRankQK, "step", lambda m, state, q, *a: calls.append(q.shape) or real(m, state, q, *a)
    )
    full = FullCache(model.config.n_layers, keep_queries=True)
    with torch.inference_mode():
        model(prompt, full, last_only=True)
        cache = from_prefill(full, policy, model.rope)
        model(steps, kvcache.TeacherForced(cache))
    n = steps.shape[1]
    assert len(calls) == n * model.config.n_layers and all(c[1] == 1 for c in calls)  # [P, 1, d] each
    assert cache.stats.selected == n * model.config.n_layers * cache.last_selected[0][:, 0].numel()
    assert 0 < cache.stats.hits < cache.stats.selected


def test_a_multi_token_step_selects_once_and_the_pass_per_position(tiny):
    """The two meanings of several new tokens differ: `attend` with Tq > 1 is one query step whose
    positions select together (scores summed over them), `attend_forced` gives each position its own
    selection, so the first position's selection is the one a one-token step would make."""
    model, prompt, steps = tiny
    policy = make_policy("oracle", budget=0.1, **FIT)
    full = FullCache(model.config.n_layers)
    with torch.inference_mode():
        model(prompt, full, last_only=True)
        together, each, single = (from_prefill(full, policy, model.rope) for _ in range(3))
        model(steps[:, :6], together)
        model(steps[:, :6], kvcache.TeacherForced(each))
        model(steps[:, :1], single)
    for layer in range(model.config.n_layers):
        assert together.last_selected[layer].shape == single.last_selected[layer].shape  # [H, S]
        assert each.last_selected[layer].shape[1] == 6  # [H, 6, S]
        assert torch.equal(each.last_selected[layer][:, 0], single.last_selected[layer])
    assert any(
        not torch.equal(together.last_selected[j], each.last_selected[j][:, -1])
        for j in range(model.config.n_layers)
    )


def test_every_cache_implements_the_cache_protocol_with_one_signature(tiny):
    """kvcache.Cache states what the model needs of a cache; every cache of the project (the two, the
    stacked and teacher-forced wrappers, the evaluation's padding row, the labs' recorder) has it, with
    the one signature attend(layer, q, k, v, pos, **asked)."""
    model, prompt, _ = tiny
    full = FullCache(model.config.n_layers, keep_queries=True)
    model(prompt, full, last_only=True)
    sparse = from_prefill(full, make_policy("oracle", **FIT), model.rope)
    caches = [full, sparse, StackedCache([sparse]), kvcache.TeacherForced(sparse), experiment.IdleRow(160)]
    caches.append(lab.QueryRecorder(full))  # the labs' recording cache (notebooks/lab.py)
    want = ["self", "layer", "q", "k", "v", "pos", "asked"]
    for cache in caches:
        assert isinstance(cache, kvcache.Cache), type(cache).__name__
        assert list(inspect.signature(type(cache).attend).parameters) == want, type(cache).__name__
        assert isinstance(cache.asks, tuple) and cache.seq_len == 160
    assert list(inspect.signature(SparseCache.attend_forced).parameters) == want
