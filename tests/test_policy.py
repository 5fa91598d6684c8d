"""policy.py: a policy's three parts, its presets, its label and identity, and the landmark kinds it asks.

Besides the one-line errors of a bad policy, two properties of the house: a policy built by hand from its
three parts (no PRESETS entry) works where a preset does, and a new landmark kind with a parameter is one
class and its KINDS entry, with no name of a kind compared anywhere outside landmarks.py.
"""

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import landmarks
import test_kvcache
from policy import (
    POLICIES,
    PRESETS,
    Exact,
    Keys,
    Policy,
    Select,
    from_params,
    make_policy,
    oracle_of,
    override,
)
from test_kvcache import full_logits, run

REPO = Path(__file__).resolve().parent.parent


tiny = test_kvcache.tiny  # the tiny random model, a 160-token prompt and 12 answer tokens (a fixture)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(name="nope"), "unknown method"),
        (dict(name="oracle", budget=0), "out of range"),
        (dict(name="oracle", budget=1.5), "out of range"),
        (dict(name="quantized", landmark_bits="7"), "unknown quantization format .7."),
        (dict(name="mean", chunk_size=0), "chunk_size"),
        (dict(name="full", kv_bits="4"), "full attention has none"),
        (dict(name="oracle", kv_bits="3b"), "unknown quantization format"),
        (dict(name="mean", chunk_size=2.5), "chunk_size 2.5 must be an int"),
        (dict(name="quantized", residual=-3), "residual -3 must be an int >= 0"),
        (dict(name="svd", rank=1.5), "rank 1.5 must be an int >= 1 or a share"),
        (dict(name="oracle", sink=-1), "sink -1 must be an int >= 0 or a share"),
        (dict(name="oracle", outliers=4), "outlier chunks are ShadowKV's"),
        (dict(name="oracle", kv_group="token"), "give kv_bits too"),
        (dict(name="oracle", score_rule="cosine"), "unknown score_rule"),
        (dict(name="oracle", colour=3), "unknown policy field"),
        # the baselines' own parameters
        (dict(name="lrqk", qk_rank=0), "qk_rank 0 must be an int >= 1 or a share"),
        (dict(name="lrqk", qk_rank=1.5), "qk_rank 1.5 must be an int >= 1 or a share"),
        (dict(name="arkvale", chunk_size=0), "chunk_size 0 must be an int >= 1"),
        (dict(name="infinigen", channels=0), "channels 0 must be a share of head_dim in"),
        (dict(name="infinigen", channels=1.5), "channels 1.5 must be a share of head_dim in"),
        (dict(name="lrqk", per="kv_head"), "lowrank_qk landmarks are kept per query head"),
        (dict(name="lrqk", resident=False), "lowrank_qk landmarks fit each query to the keys on the device"),
        (dict(name="arkvale", kv_group="token", kv_bits="4"), "a resident set keeps rows per head"),
        # a kind's parameter where it would do nothing, or of the wrong type; a chunk size given to a kind
        # of one landmark per token (it would have selected chunk indices as if they were tokens)
        (
            dict(name="mean", landmark_bits="4"),
            "landmark_bits is not a parameter of mean landmarks: it takes none",
        ),
        (
            dict(name="lrqk", channels=0.3),
            "channels is not a parameter of lowrank_qk landmarks: its parameters",
        ),
        (dict(name="oracle", chunk_size=8), "keys landmarks are one per token: chunk_size must be 1"),
        (dict(name="lrqk", chunk_size=4), "lowrank_qk landmarks are one per token"),
        (dict(name="quantized", landmark_bits=2), "landmark_bits 2 must be a string or None"),
        (dict(name="lrqk", iterations=float("nan")), "iterations nan must be an int"),
    ],
)
def test_bad_policy_is_one_line_error(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        make_policy(**kw)
    assert "\n" not in str(e.value)


def test_changing_the_kind_keeps_only_the_new_kinds_parameters():
    p = make_policy("quantized", landmarks="keys")  # the 2-bit spec was the quantized kind's: dropped
    assert p.select.kind_params == () and p.label() == "quantized keys"
    q = make_policy("oracle", landmarks="quantized", landmark_bits="4")
    assert q.select.param("landmark_bits") == "4" and q.select.param("residual") == 0
    assert q.label() == "oracle quantized 4b"
    assert make_policy("quantized", landmark_bits="4") == override(PRESETS["quantized"], landmark_bits="4")


def test_presets_keep_their_configuration_keys():
    """The keys results are resumed and merged by: a kind's parameters where the flat fields were."""
    assert make_policy("quantized").key() == (
        "name=quantized landmarks=quantized chunk_size=1 landmark_bits=2 residual=0 score_rule=softmax_max "
        "budget=0.03125 min_prompt=0 source=exact kv_bits=None sink=0 local=64 outliers=0"
    )
    assert make_policy("quantized", residual=16).key().count("residual_bits=0.5") == 1
    assert "qk_rank=None iterations=2 score_rule=dot per=query_head" in make_policy("lrqk").key()
    assert "channels=0.2 score_rule=dot per=query_head" in make_policy("infinigen").key()
    labels = [make_policy(n, **kw).label() for n, kw in [("mean", {}), ("quantized", dict(landmark_bits="fp8")), ("lrqk", dict(qk_rank=0.25)), ("infinigen", dict(channels=0.1))]]  # fmt: skip
    assert labels == ["mean c8", "quantized fp8", "lrqk r0.25", "infinigen ch0.1"]


# ------------------------------------------------------------------------------ a policy built by hand
MINE = Policy(
    "mine",
    Select(
        "quantized", chunk_size=2, budget=0.25, kind_params=dict(landmark_bits="4"), sweep=("chunk_size",)
    ),
    Keys(kv_bits="8"),
    Exact(sink=4, local=16),
)


def test_a_policy_built_by_hand_works_where_a_preset_does(tiny):
    """No PRESETS entry: its label is its name and its sweep axes, its oracle the oracle at its budget
    over its K/V format, overrides and its identity (the configuration key) work, it decodes, and with a
    budget of the whole middle over exact K/V it equals full attention, as a preset does."""
    model, prompt, steps = tiny
    assert "mine" not in PRESETS
    assert MINE.label() == "mine c2"  # its name and its sweep axes (no preset to differ from)
    assert override(MINE, chunk_size=4).label() == "mine c4"
    assert override(MINE, chunk_size=4).key() != MINE.key()
    oracle = oracle_of(MINE)
    assert oracle.label() == "oracle kv8" and oracle.select.budget == 0.25
    assert oracle.select.score_rule == "softmax_max"
    assert MINE.key().startswith("name=mine landmarks=quantized chunk_size=2 landmark_bits=4 residual=0")
    logits, cache = run(model, override(MINE, track=True), prompt, steps[:, :4])
    assert logits.shape == (4, model.config.vocab_size) and torch.isfinite(logits).all()
    assert cache.budget_line() == "budget = 4 sink + 16 local + 40 selected of 160 tokens"
    assert 0 < cache.stats.summary()["oracle_recall"] <= 1
    whole = override(MINE, budget=140 / 160, kv_bits=None, landmark_bits="fp8")  # the whole middle, exact K/V
    assert torch.allclose(
        run(model, whole, prompt, steps[:, :4])[0], full_logits(model, prompt, steps[:, :4]), atol=1e-4
    )


# ------------------------------------------------------------------------------ a new kind, one parameter
@dataclass
class ChunkKey(landmarks.Landmarks):
    """A kind that is not in the project, kept here as the example of adding one: each chunk stands in
    for its tokens by ONE of its exact keys, the one at `offset` within the chunk (0: the first)."""

    keys: torch.Tensor  # [H, N, d]
    name, chunked = "chunk_key", True
    params = (landmarks.Param("offset", 0, (int,), lambda o: o >= 0, "must be an int >= 0", "at"),)

    @classmethod
    def from_prefill(cls, k, chunk, values, prefill):
        if values["offset"] >= chunk:
            raise ValueError(f"offset {values['offset']} is outside a chunk of {chunk}")
        H, M, d = k.shape
        return cls(k.view(H, M // chunk, chunk, d)[:, :, values["offset"]])  # [H, N, d]

    @property
    def shape(self):
        return tuple(self.keys.shape)

    def tensors(self):
        return [self.keys]

    def logits(self, q):
        return landmarks.landmark_logits(q, self.keys)  # [H, G, Tq, N]


def test_adding_a_kind_with_a_parameter_is_one_class_and_its_kinds_entry(tiny, monkeypatch):
    """ChunkKey above (one class), its KINDS line and a PRESETS line are all a new kind takes: the
    policy then checks its parameter, labels and keys it, and decodes. With chunks of one token its landmark is every
    exact key, so it selects what the oracle selects: the same logits."""
    model, prompt, steps = tiny
    monkeypatch.setitem(landmarks.KINDS, "chunk_key", ChunkKey)  # the kind's line in KINDS
    select = Select("chunk_key", chunk_size=8, kind_params=dict(offset=0))
    monkeypatch.setitem(
        PRESETS, "firsts", Policy("firsts", select, Keys(), Exact(local=16))
    )  # its PRESETS line
    p = make_policy("firsts")
    assert (
        make_policy("firsts", offset=3).label() == "firsts at3"
        and "offset=3" in make_policy("firsts", offset=3).key()
    )
    with pytest.raises(ValueError, match="offset -1 must be an int >= 0"):
        make_policy("firsts", offset=-1)
    logits, cache = run(model, override(p, track=True), prompt, steps[:, :4])
    assert torch.isfinite(logits).all() and cache.stats.summary()["oracle_recall"] < 1
    one = override(p, chunk_size=1)
    oracle = make_policy("oracle", local=16)
    assert torch.equal(run(model, one, prompt, steps[:, :4])[0], run(model, oracle, prompt, steps[:, :4])[0])


def test_no_kind_name_is_compared_outside_landmarks():
    """What a kind needs, the kind says: no module outside landmarks.py compares a kind's name
    (`x.landmarks == "mean"`, `... in ("mean", ...)`) or tests a kind's class (isinstance)."""
    kinds = {k.__name__ for k in landmarks.KINDS.values()}
    found = []
    for path in sorted(REPO.glob("*.py")):
        if path.name == "landmarks.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = lambda n: {getattr(x, "attr", getattr(x, "id", None)) for x in ast.walk(n)}  # noqa: E731
            if (
                isinstance(node, ast.Compare)
                and "landmarks" in names(node)
                and any(isinstance(x, ast.Constant) and isinstance(x.value, str) for x in ast.walk(node))
            ):
                found.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                if names(node.args[1]) & kinds:
                    found.append(f"{path.name}:{node.lineno}")
    assert found == []


def test_a_configuration_is_rebuilt_from_its_parameters():
    """A results row keeps a configuration's canonical parameters (Policy.params); from_params rebuilds
    the same policy from them, for every preset (swept too) and for a policy built by hand; parameters
    that name no preset and no landmarks are refused in one line."""
    for p in [make_policy(n) for n in POLICIES] + [make_policy("quantized", residual=16, chunk_size=4), MINE]:
        assert from_params(p.params()) == p and from_params(p.params()).key() == p.key()
    with pytest.raises(ValueError, match="'magic' is no preset, and its parameters name no landmarks"):
        from_params({"name": "magic"})
