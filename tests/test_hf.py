"""hf.py: every policy inside a transformers model against model.py with the same policy, on the tiny checkpoints
of every architecture (prefill and 16 greedy decode steps through `generate`: the same selected rows at every step
and layer, logits within 1e-4, the same tokens, bytes fetched and statistics); the engine behind evaluate.py (B
rows x 1 token, one row x T tokens); InfiniGen's calibration through the transformers forward; the one-line refusals.
"""

import json
from dataclasses import dataclass

import pytest
import torch
import transformers

import evaluate
import hf
import model
import results
import skew
from conftest import ARCH_EXTRAS, TINY, make_tiny_checkpoint
from experiment import IdleRow, decode_sample
from kvcache import FullCache, SparseCache, StackedCache, from_prefill
from policy import make_policy
from test_kvcache import CASES, FIT

TOL = 1e-4  # max-abs logit difference allowed between the two engines, float32
PROMPT, STEPS = 160, 16
BUDGET = 0.1  # 16 of the 160 prompt tokens selected, as test_kvcache's invariants do
POLICIES = ["full", *CASES]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for these tiny models


@dataclass
class Pair:
    """One tiny checkpoint, loaded by model.py and by transformers, with InfiniGen's calibration by model.py."""

    path: object
    ours: object
    lm: object
    calibration: dict


@pytest.fixture(scope="module", params=list(ARCH_EXTRAS))
def pair(request, tmp_path_factory):
    path, lm = make_tiny_checkpoint(request.param, tmp_path_factory.mktemp("ckpt") / request.param)
    ours, _ = model.load_model(path)
    ids = torch.randint(0, TINY["vocab_size"], (200,), generator=torch.Generator().manual_seed(3))
    return Pair(path, ours, lm, skew.fit(ours, ids.tolist()))


def prompt(n=PROMPT, seed=1):
    return torch.randint(0, TINY["vocab_size"], (1, n), generator=torch.Generator().manual_seed(seed))


def policy_of(name):
    if name == "full":
        return make_policy("full")
    return make_policy(name, budget=BUDGET, **FIT, **CASES[name], track=True)


def snapshot(cache):
    """What a cache selected at its last step, per layer: the selected rows (None before the first step and in a
    dense layer) and the rows a resident set holds (ArkVale, LRQK: after the prefill, LRQK's first selection)."""
    if not isinstance(cache, SparseCache):
        return None
    return [
        (
            None if sel is None else sel.clone(),
            None if st.resident is None else st.resident.idx.clone(),
        )
        for sel, st in zip(cache.last_selected, cache.layers)
    ]


@dataclass
class Run:
    logits: torch.Tensor  # [1 + STEPS, vocab]: the prefill's last position, then each decode step
    tokens: list  # 1 + STEPS greedy tokens
    snapshots: list  # after the prefill and after each step
    cache: object


@torch.inference_mode()
def run_model_py(pair, policy, ids):
    cal = pair.calibration if policy.sparse and policy.select.kind.needs_calibration else None
    cache, logits = model.prefill(pair.ours, ids[0].tolist(), policy, calibration=cal)
    out, tokens, snaps = [logits], [int(logits.argmax())], [snapshot(cache)]
    for _ in range(STEPS):
        logits = pair.ours(torch.tensor([[tokens[-1]]]), cache)[0, -1]  # [vocab]
        out.append(logits), tokens.append(int(logits.argmax())), snaps.append(snapshot(cache))
    return Run(torch.stack(out), tokens, snaps, cache)


class Snapshots(transformers.StoppingCriteria):
    """generate's own hook after every forward: record what the policy's cache selected, never stop."""

    def __init__(self, bridge):
        self.bridge, self.taken = bridge, []

    def __call__(self, input_ids, scores, **kwargs):
        self.taken.append(snapshot(self.bridge.cache))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def run_generate(pair, policy, ids, calibration=None):
    """The user's side: a policy cache, model.generate (greedy), the cache's accounting afterwards."""
    if calibration is None and policy.sparse and policy.select.kind.needs_calibration:
        calibration = pair.calibration
    cache = hf.policy_cache(pair.lm, policy, calibration=calibration)
    snaps = Snapshots(cache)
    out = pair.lm.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        cache=cache,
        max_new_tokens=1 + STEPS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        stopping_criteria=transformers.StoppingCriteriaList([snaps]),
    )
    logits = torch.cat(out.logits).float()  # [1 + STEPS, vocab]
    return Run(logits, out.sequences[0, ids.shape[1] :].tolist(), snaps.taken, cache.cache)


def same_snapshots(a, b):
    if a is None or b is None:
        return a is None and b is None
    return all(
        all(
            x is None and y is None or x is not None and y is not None and torch.equal(x, y)
            for x, y in zip(p, q)
        )
        for p, q in zip(a, b)
    )


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", POLICIES)
def test_generate_with_every_policy_matches_model_py(pair, name):
    policy, ids = policy_of(name), prompt()
    want, got = run_model_py(pair, policy, ids), run_generate(pair, policy, ids)
    assert isinstance(got.cache, type(want.cache)) and (name == "full") == isinstance(got.cache, FullCache)
    assert want.logits.std() > 0.3, "logits near zero would make the comparison vacuous"
    assert (got.logits - want.logits).abs().max() < TOL
    assert got.tokens == want.tokens
    assert len(got.snapshots) == len(want.snapshots) == 1 + STEPS
    for step, (a, b) in enumerate(zip(want.snapshots, got.snapshots)):
        assert same_snapshots(a, b), f"step {step}: the selections differ"
    assert got.cache.budget_line() == want.cache.budget_line()
    if name == "full":
        return
    assert want.snapshots[-1][-1][0] is not None, "the last layer selected: the comparison is not vacuous"
    assert got.cache.bytes_fetched == want.cache.bytes_fetched > 0
    a, b = want.cache.stats.summary(), got.cache.stats.summary()
    assert a.keys() == b.keys() and a["hit_rate"] == b["hit_rate"]
    for key in a.keys() - {"hit_rate"}:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_engine_decodes_stacked_rows_and_several_tokens_as_model_py(pair):
    """The engine behind evaluate.py: any object with the cache protocol behind the transformers model, for a
    decode step of 8 rows (StackedCache, one of them idle, as experiment.forward_rows pads) and for one row fed 4
    tokens at once (a teacher-forced pass): the same logits and selections as model.py's."""
    engine = hf.Engine(pair.lm)
    ids = prompt()
    names = ["full", "oracle", "shadowkv", "quantized", "paper", "arkvale", "lrqk"]
    policies = [policy_of(n) for n in names]
    steps = torch.randint(0, TINY["vocab_size"], (3, 8), generator=torch.Generator().manual_seed(5))  # [3, 8]
    got = {}
    for m in (pair.ours, engine):
        with torch.inference_mode():
            full, _ = model.prefill(m, ids[0].tolist(), keep_queries=True)
            caches = [from_prefill(full, p, m.rope) for p in policies]
            rows = [
                m(steps[i][:, None], StackedCache(caches + [IdleRow(PROMPT + i)]))[: len(names), -1]
                for i in range(3)
            ]  # [7, vocab] each
            several = from_prefill(full, policy_of("quantized"), m.rope)
            block = m(steps[:1, :4], several)[0]  # [4, vocab]: one row, 4 new tokens
        got[m is engine] = (torch.stack(rows), caches, block, several)
    (a, ca, ba, sa), (b, cb, bb, sb) = got[False], got[True]
    assert (a - b).abs().max() < TOL and (ba - bb).abs().max() < TOL
    for x, y in [*zip(ca, cb), (sa, sb)]:
        assert same_snapshots(snapshot(x), snapshot(y)) and x.bytes_fetched == y.bytes_fetched


def test_evaluate_decode_sample_through_the_engine(pair):
    """experiment.decode_sample (gold and free rows in lockstep forwards of 8) through the engine: every row's
    tokens and gold log-probabilities as through model.py."""
    engine = hf.Engine(pair.lm)
    ids = prompt()[0].tolist()
    gold_ids = torch.randint(
        0, TINY["vocab_size"], (10,), generator=torch.Generator().manual_seed(6)
    ).tolist()
    policies = [policy_of(n) for n in ("oracle", "mean", "quantized", "lrqk")]
    a, fa = decode_sample(pair.ours, ids, policies, gold_ids, 10)
    b, fb = decode_sample(engine, ids, policies, gold_ids, 10)
    for key in a:
        assert a[key].out == b[key].out and fa[key].out == fb[key].out
        assert max(abs(x - y) for x, y in zip(a[key].gold_logp, b[key].gold_logp)) < TOL
        assert b[key].kl == pytest.approx(a[key].kl, abs=1e-5) and a[key].matches == b[key].matches


def test_the_engine_rope_is_the_models_own(pair):
    """The caches rotate and un-rotate keys with the model's own cos / sin (hf.ModelRope): `apply` is the model's
    rotation and `invert` undoes it, at every position; model.Rope's float64 tables are another rounding of them."""
    engine = hf.Engine(pair.lm)
    pos = torch.arange(pair.ours.config.max_positions)  # [P]
    x = torch.randn(1, 2, len(pos), engine.config.head_dim, generator=torch.Generator().manual_seed(7))
    cos, sin = pair.lm.model.rotary_emb(x, pos[None])  # [1, P, d] each: what the model rotates its q, k with
    theirs = hf._rotate(x, cos, sin)  # [1, 2, P, d]
    assert (engine.rope.apply(x, pos) - theirs).abs().max() < 1e-6
    assert (engine.rope.invert(theirs, pos) - x).abs().max() < 1e-5
    assert 0 < (pair.ours.rope.apply(x, pos) - theirs).abs().max() < 1e-3


# ----------------------------------------------------------------------------- InfiniGen's calibration
def test_infinigen_calibration_through_the_transformers_forward(pair, tmp_path, monkeypatch):
    """hf.calibration fits InfiniGen's skews with the transformers forward (skew.fit through the engine), cached in
    a file of its own, apart from model.py's; fitted by the two forwards they keep the same channels, and
    InfiniGen selects with each as model.py does with its own."""
    monkeypatch.setenv("KVOFFLOAD_CACHE", str(tmp_path))
    tok = model.load_tokenizer(pair.path)
    theirs, ours = hf.calibration(pair.lm, tok), skew.calibration(pair.ours, tok)
    assert len(list((tmp_path / "infinigen").glob("*.pt"))) == 2  # one file per engine
    assert torch.equal(hf.calibration(pair.lm, tok)["skew"], theirs["skew"])  # read back from its file
    assert torch.equal(theirs["mask"], ours["mask"])
    # an orthogonal skew's columns are singular vectors: the same up to their signs
    assert (theirs["skew"].abs() - ours["skew"].abs()).abs().max() < 1e-3
    policy, ids = policy_of("infinigen"), prompt()
    want = run_model_py(Pair(pair.path, pair.ours, pair.lm, ours), policy, ids)
    got = run_generate(pair, policy, ids, calibration=theirs)
    assert got.tokens == want.tokens and (got.logits - want.logits).abs().max() < TOL
    assert all(same_snapshots(a, b) for a, b in zip(want.snapshots, got.snapshots))


# ----------------------------------------------------------------------------- evaluate.py --engine transformers
def test_evaluate_engine_transformers_gives_model_py_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(results, "make_plots", lambda out, summary: [])
    path, _ = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "llama", max_position_embeddings=4096)
    argv = ["--model", path, "--n", 1, "--tokens", 2048, "--max-new-tokens", 6, "--workers", 1]
    argv += ["--methods", "full,oracle,shadowkv,quantized,lrqk"]
    rows = {}
    for engine in ("model.py", "transformers"):
        out = tmp_path / engine
        assert evaluate.main([str(a) for a in argv + ["--engine", engine, "--out", out]]) == 0
        rows[engine] = {r["key"]: r for r in results.read_rows(out)}
    assert json.loads((tmp_path / "transformers" / "run.json").read_text())["model"].endswith(
        "(transformers)"
    )
    a, b = rows.values()
    assert a.keys() == b.keys() and len(a) == 5
    for key, r in a.items():
        for field, value in r.items():
            numbers = (
                isinstance(value, float) or isinstance(value, list) and value and isinstance(value[0], float)
            )
            want = pytest.approx(value, abs=1e-4) if numbers else value
            assert b[key][field] == want, (key, field)
    capsys.readouterr()
    # a results folder holds one engine's results: resuming it with the other is refused in one line
    rc = evaluate.main([str(a) for a in argv + ["--engine", "transformers", "--out", tmp_path / "model.py"]])
    err = capsys.readouterr().err
    assert rc == 2 and "(transformers)" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- refusals and the model's own path
def one_line(err):
    assert "\n" not in str(err.value)
    return str(err.value)


def tiny_llama(**config):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY | config)).eval()


def test_a_model_of_another_architecture_is_refused():
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(ValueError) as e:
        hf.policy_cache(gpt2, make_policy("quantized"))
    assert one_line(e).startswith(
        "unsupported architecture GPT2LMHeadModel: policies run inside LlamaForCausalLM"
    )


def test_rope_kvcache_cannot_apply_refuses_the_policies_that_need_it():
    """A RoPE model.Rope does not apply (yarn): the policies that rebuild or re-rotate keys are refused before any
    work, naming it; the others run, selecting at every step."""
    yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=512)
    lm = tiny_llama(rope_parameters=yarn)
    calls = []
    lm.register_forward_pre_hook(lambda *args: calls.append(1))
    for name, what in (
        ("svd", "low-rank keys"),
        ("shadowkv", "low-rank keys"),
        ("paper", "keys before RoPE"),
    ):
        with pytest.raises(ValueError) as e:
            hf.policy_cache(lm, make_policy(name))
        assert what in one_line(e) and "unsupported rope scaling type 'yarn'" in one_line(e)
    assert calls == []  # refused before any forward
    with pytest.raises(ValueError, match="kvcache cannot apply this model's RoPE"):
        hf.Engine(lm).rope.invert(torch.zeros(1, 2, 3, 16), torch.arange(3))
    cache = hf.policy_cache(lm, make_policy("quantized", budget=BUDGET, **FIT))
    ids = prompt()
    lm.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=4, do_sample=False)
    assert isinstance(cache.cache, SparseCache) and all(s is not None for s in cache.cache.last_selected)


def test_infinigen_without_its_calibration_is_refused(pair):
    with pytest.raises(ValueError) as e:
        hf.policy_cache(pair.lm, policy_of("infinigen"))
    assert "needs its calibration of the model" in one_line(e) and "hf.calibration" in one_line(e)
    other = dict(skew=torch.eye(8).expand(3, 4, 8, 8), mask=torch.ones(3, 4, 8, dtype=torch.bool))
    with pytest.raises(ValueError) as e:
        hf.policy_cache(pair.lm, policy_of("infinigen"), calibration=other)
    assert "the calibration is of a model with 3 layers" in one_line(e)


def test_what_a_policy_cache_does_not_decode_is_one_line():
    """Several rows (a batch, or beams), padding and beam search's reordering are refused at the first forward (a
    sparse cache holds one sequence), each in one line."""
    lm, ids = tiny_llama(), prompt()
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    cases = [
        ("oracle", dict(input_ids=ids.expand(2, -1)), "holds one sequence"),
        ("oracle", dict(input_ids=ids, attention_mask=padded), "padding"),
        ("oracle", dict(input_ids=ids, num_beams=2), "num_beams > 1"),
        (
            "full",
            dict(input_ids=ids, num_beams=2),
            "beam search",
        ),  # full attention holds rows: beams reorder them
    ]
    for name, kw, match in cases:
        cache = hf.policy_cache(lm, policy_of(name))
        with pytest.raises(ValueError) as e:
            lm.generate(**kw, cache=cache, max_new_tokens=3, pad_token_id=0)
        assert match in one_line(e)


def test_the_model_keeps_its_own_attention_without_a_policy_cache():
    """After hf.policy_cache the model's attention implementation is ATTENTION; without a bridge it is sdpa's,
    masks included: generate with transformers' own cache gives the same tokens as before, padded batch too."""
    lm = tiny_llama()
    ids = torch.cat([prompt(40), prompt(40, seed=2)])  # [2, 40]
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1 left-padded by 5 tokens
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    before = lm.generate(ids, **kw)
    hf.policy_cache(lm, make_policy("oracle"))
    assert lm.config._attn_implementation == hf.ATTENTION
    assert torch.equal(lm.generate(ids, **kw), before)
