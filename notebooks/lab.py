"""What the course notebooks share: one Text2JSON prompt, its teacher-forced queries, a forced decode.

Not part of the library: these helpers only wire the project's modules (model.py, kvcache.py,
text2json.py) together the same way in every notebook, so each notebook's cells can stay short and
about its own failure mode. Every notebook starts with

    import sys; sys.path.insert(0, "..")   # the repo root: model.py, kvcache.py, ...
    import lab

and runs on a laptop CPU: the default model is SmolLM2-135M-Instruct, prompts are ~1K tokens.
"""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import experiment  # noqa: E402
import landmarks  # noqa: E402
import text2json  # noqa: E402
from kvcache import FullCache, StackedCache, from_kv, from_prefill  # noqa: E402
from policy import make_policy, override  # noqa: E402

SEED = 0  # text2json.generate seed shared by all notebooks
SAMPLE = 4  # a "people" sample on which the tiny model writes several records correctly


def text2json_sample(tok, n_tokens=1024, index=SAMPLE, seed=SEED):
    """One synthetic Text2JSON sample (text2json.generate) and its chat-formatted prompt ids.

    Returns (sample, prompt_ids, gold) with gold the list of record dicts.
    """
    sample = text2json.generate(index + 1, n_tokens, tok, seed=seed)[index]
    prompt_ids = tok.chat([{"role": "user", "content": sample["problem"]}])
    return sample, prompt_ids, json.loads(sample["answer"])


def token_spans(tok, text, pieces, start=0):
    """Token index ranges of `pieces` (substrings, found in order from char `start`) in tok's encoding of text.

    Why: to point at "the tokens of a fact" we need token positions, not characters; the tokenizer's
    offsets map one to the other. Returns a list of (first, last + 1) token indices.
    """
    offsets = tok.tok.encode(text, add_special_tokens=False).offsets  # [(char_start, char_end)] per token
    spans, pos = [], start
    for piece in pieces:
        i = text.find(piece, pos)
        if i < 0:
            raise ValueError(f"{piece!r} is not in the text after char {pos}")
        j = i + len(piece)
        toks = [t for t, (a, b) in enumerate(offsets) if a < j and b > i]
        spans.append((toks[0], toks[-1] + 1))
        pos = j
    return spans


def sentence_start(text, name):
    """Char index where the sentence stating `name` starts (record names are unique in a sample)."""
    i = text.index(name)
    return max(text.rfind(". ", 0, i) + 2, text.rfind("\n", 0, i) + 1, 0)


def fact_spans(tok, sample, gold):
    """Where each field value of the gold answer is written, in the answer and in the prompt.

    Returns a list of dicts: record (index), key, value, `answer` = token span of the value in
    tok.encode(sample["answer"]) (its first token may also hold the opening quote), `prompt` = token
    span of the value in the record's sentence of the chat-formatted prompt (= tok.chat's ids).
    """
    chat = tok.format_chat([{"role": "user", "content": sample["problem"]}])
    answer = sample["answer"]
    facts, pos = [], 0
    for n, record in enumerate(gold):
        start = sentence_start(chat, record["name"])
        for key, value in record.items():
            pos = answer.index(f'"{key}": "', pos) + len(f'"{key}": "')
            (a_span,) = token_spans(tok, answer, [value], start=pos)
            (p_span,) = token_spans(tok, chat, [value], start=start)
            facts.append(dict(record=n, key=key, value=value, answer=a_span, prompt=p_span))
            pos += len(value)
    return facts


def gold_forced(model, tok, sample, policies):
    """evaluate.py's gold-forced decoding of one sample (experiment.decode_sample, not a copy of it).

    Full attention and every policy are fed the gold answer one token per step. Returns (gold_ids,
    fields, rows): fields as text2json.fact_tokens (each gold value and its token indices), rows
    {policy label: experiment.GoldRow} whose `out` is the top-1 prediction at every answer position.
    """
    ids = tok.chat([{"role": "user", "content": sample["problem"]}])
    gold_ids, fields = text2json.fact_tokens(sample["answer"], tok)
    sparse = [p for p in policies if p.sparse]
    gold, _ = experiment.decode_sample(model, ids, sparse, gold_ids, len(gold_ids), free=False)
    labels = {p.key(): p.label() for p in [make_policy("full"), *policies]}
    return gold_ids, fields, {labels[key]: row for key, row in gold.items()}


class QueryRecorder:
    """A cache wrapper that keeps every layer's post-RoPE queries, then lets the real cache attend.

    The model hands each layer's q, k, v to `cache.attend` (kvcache.py); recording q there lets a
    notebook score the prompt's keys offline exactly as the policies do at decode time. It is a cache
    like any other (kvcache.Cache): it asks for what the cache it wraps asks for.
    """

    def __init__(self, cache):
        self.cache = cache
        self.asks = cache.asks
        self.q = [None] * len(cache.k)  # per layer [n_heads, T, head_dim] of the last call

    @property
    def seq_len(self):
        return self.cache.seq_len

    def attend(self, layer, q, k, v, pos, **asked):
        self.q[layer] = q[0].detach().clone()  # [n_heads, T, head_dim]
        return self.cache.attend(layer, q, k, v, pos, **asked)


@torch.inference_mode()
def prefill(model, prompt_ids, record=False):
    """Full-attention prefill of prompt_ids (one forward pass). Returns (cache, logits of the last token).

    With record=True the cache is wrapped in a QueryRecorder, returned instead of the bare cache. The
    cache keeps the prompt's queries too, for the policies built from them (LRQK).
    """
    cache = FullCache(model.config.n_layers, keep_queries=True)
    wrapped = QueryRecorder(cache) if record else cache
    logits = model(torch.tensor([prompt_ids]), wrapped, last_only=True)[0, -1]  # [vocab]
    return wrapped, logits


@torch.inference_mode()
def forced_queries(model, prompt_ids, answer_ids):
    """Queries of full attention while it reads the prompt and then the answer (teacher forcing).

    One forward pass over prompt + answer; with full attention that is the same as decoding the
    answer token by token. Returns (cache, q, logits): the full cache (its k[layer] / v[layer] hold
    the exact post-RoPE K/V, [1, kv_heads, T + A, head_dim]), q a list over layers of the queries of
    the answer positions [n_heads, A, head_dim], logits [A, vocab] (row i predicts answer_ids[i + 1]).
    """
    rec = QueryRecorder(FullCache(model.config.n_layers))
    logits = model(torch.tensor([prompt_ids + answer_ids]), rec)[0]  # [T + A, vocab]
    A = len(answer_ids)
    return rec.cache, [q[:, -A:] for q in rec.q], logits[-A:]


def cut_prompt(full, prompt_len):
    """A full cache holding only the first prompt_len tokens of `full` (new lists, shared tensors)."""
    return from_kv([k[:, :, :prompt_len] for k in full.k], [v[:, :, :prompt_len] for v in full.v])


@torch.inference_mode()
def decode_policies(model, full, policies, steps, first=None, feed=None, track=False, calibration=None):
    """Decode every policy from one prefilled full cache, as one batch (kvcache.StackedCache).

    full: a full-attention cache holding exactly the prompt. Free-running (feed None): every row
    starts from `first` (the prefill's prediction, exact for every policy) and then reads its own
    greedy tokens. Teacher forcing (feed a token list): every row reads feed[i] at step i, the way
    evaluate.py measures fidelity. track=True makes the caches record recall against the oracle
    (cache.stats). calibration: InfiniGen's (skew.calibration), for the policies that need it. Returns
    (caches, logits [P, steps, vocab]); logits[:, i] follow the i-th token read.
    """
    caches = [
        from_prefill(full, override(p, track=track), model.rope, calibration=calibration) for p in policies
    ]
    stacked = StackedCache(caches)
    x = torch.full((len(caches), 1), first if feed is None else feed[0])  # [P, 1]
    logits = []
    for i in range(steps):
        out = model(x, stacked)[:, -1]  # [P, vocab]
        logits.append(out)
        if i + 1 < steps:
            x = out.argmax(-1, keepdim=True) if feed is None else torch.full_like(x, feed[i + 1])  # [P, 1]
    return caches, torch.stack(logits, 1)


# ----------------------------------------------------------------------------- selection, replayed offline


def step_scores(q, marks):
    """The selection score of every landmark at every decode step, each step on its own.

    q: [n_heads, A, d] queries of A decode steps (one layer); marks: a landmark kind as a cache stores
    it (a landmarks.Landmarks kind), or an exact key tensor [H, N, d]. The rule is kvcache's,
    landmarks.score (softmax over the landmarks, max over the GQA group), with each_position=True so that
    the A steps cost one call and each is scored as a decode step of that one position would score it;
    removed landmarks (ShadowKV's outliers) leave before the softmax and score -inf, as in that decode
    step. Returns [A, H, N].
    """
    marks = landmarks.TokenKeys(marks) if isinstance(marks, torch.Tensor) else marks
    n_heads, A, d = q.shape
    H = marks.shape[0]  # KV heads
    scores = landmarks.score(q.view(H, n_heads // H, A, d), marks, each_position=True)  # [H, A, N]
    return scores.transpose(0, 1).contiguous()  # [A, H, N]


def selected_positions(cache, layer, q):
    """Absolute prompt positions a sparse cache attends at each of A decode steps, for queries q [n_heads, A, d].

    Replays step 1 of kvcache's decode (SparseCache.select: score the landmarks, top-k chunks per KV head,
    expanded to tokens) on the cache's own stored summary, one step at a time, and adds the tokens it
    keeps exact (any sink, the local window, ShadowKV's outliers). Returns [A, H, S + F] int64.
    """
    n_heads, A, d = q.shape
    H = cache.layers[layer].marks.shape[0]  # KV heads
    idx = torch.stack(
        [cache.select(layer, q[:, a : a + 1].reshape(H, n_heads // H, 1, d)) for a in range(A)]
    )  # [A, H, S]
    exact = cache.layers[layer].exact.prompt_pos  # [H, F]
    return torch.cat([idx + cache.split.sink, exact.expand(A, -1, -1)], dim=2)  # [A, H, S + F]


def oracle_positions(keys, q, k, sink=0, local=64):
    """The oracle's choice: the k prompt tokens with the highest exact score, per step and KV head.

    keys: [H, T, d] exact post-RoPE prompt keys; q: [n_heads, A, d]. Candidates are the tokens between
    the sink (none in the presets) and the local window (attended anyway), as in kvcache. Returns [A, H, k].
    """
    T = keys.shape[1]
    scores = step_scores(q, keys[:, sink : T - local])  # [A, H, M]
    A, H, M = scores.shape
    return landmarks.select_topk(scores.reshape(A * H, M), k).view(A, H, k) + sink


def recall(attended, oracle, T):
    """Share of the oracle's tokens that are attended, per step and KV head: [A, H] float.

    attended: [A, H, S] positions; oracle: [A, H, K] positions; T: prompt length.
    """
    hit = torch.zeros(*attended.shape[:2], T, dtype=torch.bool).scatter_(2, attended, True)  # [A, H, T]
    return hit.gather(2, oracle).float().mean(2)
