"""Chat formats found lazily (tokenizer only, no weights): Mistral and Llama 2 against golden ids from
the checkpoints' own templates, the plain prompt for a tokenizer with no format, and the CLI's --no-chat."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model
from conftest import make_tiny_checkpoint, sentencepiece_tokenizer, word_tokenizer

ROOT = Path(__file__).resolve().parent.parent

# A two-turn conversation with a system message; the spaces test which parts each template strips.
TWO_TURNS = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "  Paris. "},
    {"role": "user", "content": "And of Italy? "},
]

# Golden ids, obtained once (transformers 5.24, jinja2): PreTrainedTokenizerFast(tokenizer_object=
# conftest.sentencepiece_tokenizer(...), bos_token="<s>", eos_token="</s>").apply_chat_template(TWO_TURNS
# [or TWO_TURNS[1:]], chat_template=<template>, add_generation_prompt=True, tokenize=True), where <template>
# is the `chat_template` of the checkpoint's tokenizer_config.json: meta-llama/Llama-2-7b-chat-hf for
# LLAMA2_*, mistralai/Mistral-7B-Instruct-v0.3 (with its [INST] / [/INST] control tokens, ids 3 and 4) for
# MISTRAL_*. The tokenizer is Llama-2-like (byte fallback, "▁" for spaces), so the ids show every space.
LLAMA2_IDS = [
    1,
    293,
    296,
    287,
    259,
    63,
    63,
    291,
    92,
    291,
    65,
    65,
    13,
    68,
    273,
    278,
    282,
    264,
    277,
    259,
    268,
    273,
    259,
    274,
    273,
    264,
    259,
    282,
    274,
    277,
    263,
    49,
    13,
    63,
    63,
    288,
    291,
    92,
    291,
    65,
    65,
    13,
    13,
    90,
    267,
    260,
    279,
    259,
    268,
    278,
    259,
    279,
    267,
    264,
    259,
    262,
    260,
    275,
    268,
    279,
    260,
    271,
    259,
    274,
    265,
    259,
    73,
    277,
    260,
    273,
    262,
    264,
    66,
    293,
    288,
    296,
    287,
    259,
    83,
    260,
    277,
    268,
    278,
    49,
    259,
    2,
    1,
    293,
    296,
    287,
    259,
    68,
    273,
    263,
    259,
    274,
    265,
    259,
    289,
    279,
    260,
    271,
    284,
    66,
    293,
    288,
    296,
    287,
]
LLAMA2_TEXT_NO_SYSTEM = (
    "<s>[INST] What is the capital of France? [/INST] Paris. </s><s>[INST] And of Italy? [/INST]"
)
MISTRAL_IDS = [
    1,
    3,
    261,
    261,
    92,
    269,
    262,
    281,
    261,
    270,
    280,
    261,
    281,
    269,
    266,
    261,
    264,
    262,
    277,
    270,
    281,
    262,
    273,
    261,
    276,
    267,
    261,
    75,
    279,
    262,
    275,
    264,
    266,
    68,
    4,
    261,
    261,
    85,
    262,
    279,
    270,
    280,
    51,
    2,
    3,
    261,
    261,
    70,
    275,
    280,
    284,
    266,
    279,
    261,
    270,
    275,
    261,
    276,
    275,
    266,
    261,
    284,
    276,
    279,
    265,
    51,
    15,
    15,
    70,
    275,
    265,
    261,
    276,
    267,
    261,
    291,
    281,
    262,
    273,
    286,
    68,
    261,
    4,
]
MISTRAL_IDS_NO_SYSTEM = [
    1,
    3,
    261,
    261,
    92,
    269,
    262,
    281,
    261,
    270,
    280,
    261,
    281,
    269,
    266,
    261,
    264,
    262,
    277,
    270,
    281,
    262,
    273,
    261,
    276,
    267,
    261,
    75,
    279,
    262,
    275,
    264,
    266,
    68,
    4,
    261,
    261,
    85,
    262,
    279,
    270,
    280,
    51,
    2,
    3,
    261,
    261,
    70,
    275,
    265,
    261,
    276,
    267,
    261,
    291,
    281,
    262,
    273,
    286,
    68,
    261,
    4,
]
# the line of Llama 2's template that names its format (the rest of the template is not read)
LLAMA2_TEMPLATE_LINE = (
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
)


def checkpoint(tmp_path, name, tokenizer, template=None, arch="LlamaForCausalLM"):
    path, hf = make_tiny_checkpoint(
        arch, tmp_path / name, tokenizer=tokenizer, bos_token_id=1, eos_token_id=2
    )
    if template is not None:
        (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return path, hf


def test_llama2_two_turns_match_golden_ids(tmp_path):
    path, _ = checkpoint(tmp_path, "llama2", sentencepiece_tokenizer(), LLAMA2_TEMPLATE_LINE)
    tok = model.load_tokenizer(path)
    assert tok.template == "llama2" and tok.stop_ids == [2]
    assert tok.chat(TWO_TURNS) == LLAMA2_IDS
    assert tok.format_chat(TWO_TURNS[1:]) == LLAMA2_TEXT_NO_SYSTEM
    assert tok.decode(LLAMA2_IDS).startswith("[INST] <<SYS>>\nAnswer in one word.\n<</SYS>>\n\nWhat is")


def test_mistral_two_turns_match_golden_ids(tmp_path):
    path, _ = checkpoint(tmp_path, "mistral", sentencepiece_tokenizer(["[INST]", "[/INST]"]))
    tok = model.load_tokenizer(path)  # found by its [INST] control token, no template needed
    assert tok.template == "mistral" and tok.stop_ids == [2]
    assert tok.chat(TWO_TURNS) == MISTRAL_IDS  # the system message goes before the last user message
    assert tok.chat(TWO_TURNS[1:]) == MISTRAL_IDS_NO_SYSTEM


def test_mistral_found_by_template_text_when_inst_is_not_a_token(tmp_path, capsys):
    """Mistral v0.1 / v0.2 tokenizers spell [INST] as text: the checkpoint's template names the format."""
    path, _ = checkpoint(tmp_path, "m01", sentencepiece_tokenizer(), "{{ '[INST] ' + message['content'] }}")
    capsys.readouterr()
    tok = model.load_tokenizer(path)
    assert tok.template == "mistral"
    assert tok.format_chat(TWO_TURNS[1:2]) == "<s>[INST] What is the capital of France?[/INST]"
    assert capsys.readouterr().err == ""
    # v0.1's first template spaced "[/INST]" differently from v0.3's: said in one warning line
    v01 = "{{ '[INST] ' + c + ' [/INST]' }}"
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": v01}))
    model.load_tokenizer(path).chat(TWO_TURNS[1:2])
    err = capsys.readouterr().err
    assert err.startswith("warning: the chat template in") and err.count("\n") == 1


@pytest.mark.parametrize(
    "file,text",
    [
        ("tokenizer_config.json", "{not json"),
        ("tokenizer_config.json", json.dumps({"chat_template": 3})),
        ("tokenizer_config.json", json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}, 1]})),
        ("chat_template.jinja", b"\xff\xfe<<SYS>> [/INST]"),
    ],
)
def test_an_odd_template_is_read_without_error(tmp_path, file, text, capsys):
    """The template is only searched for facts: one that cannot be read gives none, never an error
    (a non-UTF-8 file is read with its bad bytes replaced, so its text still counts); a
    tokenizer_config.json that is no JSON object is said in one warning line, never silently ignored."""
    path, _ = checkpoint(tmp_path, "odd", sentencepiece_tokenizer(["[INST]", "[/INST]"]))
    (path / file).write_bytes(text if isinstance(text, bytes) else text.encode())
    capsys.readouterr()
    tok = model.load_tokenizer(path)
    err = capsys.readouterr().err
    if text == "{not json":
        assert err.startswith("warning: ") and "is not valid JSON" in err and err.count("\n") == 1, err
    assert tok.template == ("llama2" if file.endswith(".jinja") else "mistral")
    assert tok.facts.inst_end_spaced == file.endswith(".jinja") and tok.facts.default_system is None
    assert tok.chat(TWO_TURNS[1:2])[:2] == [1, 3]  # <s> [INST], in both formats


@pytest.mark.parametrize("fmt", ["mistral", "llama2"])
def test_inst_formats_refuse_turns_out_of_order(tmp_path, fmt):
    path, _ = checkpoint(tmp_path, fmt, sentencepiece_tokenizer(), LLAMA2_TEMPLATE_LINE)
    tok = model.load_tokenizer(path, chat_format=fmt)
    with pytest.raises(ValueError) as e:
        tok.chat([TWO_TURNS[1], TWO_TURNS[1]])
    msg = str(e.value)
    assert msg.startswith(f"the {fmt} chat format needs an optional system message") and "\n" not in msg


def test_tokenizer_without_chat_tokens_loads_and_prompts_plainly(tmp_path, capsys):
    """A base model's tokenizer: the weights load and run; a chat becomes the plain text, with one warning."""
    words = "the capital of france is paris".split()
    path, hf = checkpoint(tmp_path, "base", word_tokenizer(words))
    capsys.readouterr()  # transformers' save progress bar
    m, tok = model.load_model(path)
    assert capsys.readouterr().err == ""  # nothing about chat formats until a chat is formatted
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 0, 3]])  # [1, 8]
    with torch.inference_mode():
        assert (m(ids) - hf(ids).logits).abs().max() < 1e-4
    msgs = [{"role": "system", "content": "the capital"}, {"role": "user", "content": "of france is"}]
    assert tok.template == "plain" and tok.stop_ids == [2]
    assert tok.chat(msgs) == [1, 2, 3, 4, 5] and tok.chat(msgs) == [1, 2, 3, 4, 5]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning:") and "no known chat format" in err  # once
    # asked for explicitly: no warning, and a chat-format tokenizer gives its plain text too
    tok = model.load_tokenizer(path, chat_format="plain")
    assert tok.chat(msgs) == [1, 2, 3, 4, 5] and capsys.readouterr().err == ""
    q, _ = make_tiny_checkpoint("Qwen2ForCausalLM", tmp_path / "q")
    assert model.load_tokenizer(q, chat_format="plain").format_chat(msgs) == "the capital\n\nof france is"
    with pytest.raises(ValueError) as e:
        model.load_tokenizer(q, chat_format="vicuna")
    assert str(e.value).startswith("unknown chat format 'vicuna'")


def test_cli_no_chat_and_plain_warning(tmp_path):
    path, _ = checkpoint(tmp_path, "base", word_tokenizer("the capital of france is paris".split()))
    run = lambda *a: subprocess.run(
        [
            sys.executable,
            str(ROOT / "model.py"),
            "--model",
            str(path),
            "--prompt",
            "the capital of france is",
            "--max-new-tokens",
            "3",
            *a,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    r = run()
    assert r.returncode == 0 and r.stderr.startswith("warning:") and r.stderr.count("\n") == 1
    r2 = run("--no-chat")
    assert r2.returncode == 0 and r2.stderr == "" and r2.stdout == r.stdout
