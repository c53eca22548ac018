"""Write a random-weight Chatterbox checkpoint in chatterbox's from_local layout.

    python tools/random_checkpoint.py DIR --model turbo|standard|multilingual [--tiny] [--seed N]

The modules are chatterbox's own classes (built by server.build_chatterbox), with
seeded random weights. --tiny shrinks every part that upstream lets shrink and
records the sizes in chatterbox_arch.json, so the directory is self-describing:
`TTS_MODEL=turbo MODEL_DIR=DIR python server.py` serves it with no other setting.
The built-in voice (conds.pt) is prepared by the real voice pipeline from a
synthetic, seeded reference clip. Nothing touches the network.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import server

_TINY_S3GEN = {
    "encoder": {"linear_units": 256, "num_blocks": 1},
    "decoder": {"channels": 64, "attention_head_dim": 32, "n_blocks": 1, "num_mid_blocks": 1, "num_heads": 2},
    "hift": {"base_channels": 32, "f0_channels": 32},
    "campplus_channels": 32,
    "tokenizer": {"state": 128, "heads": 2, "layers": 1},  # rotary head dim is fixed at 64,
}
_TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 32,
}
TINY_ARCH = {
    "turbo": {"t3": {"n_embd": 64, "hidden_size": 64, "n_layer": 2, "n_head": 2, "n_positions": 2048}},
    "standard": {"t3": _TINY_LLAMA},
    # Multilingual's alignment analyzer reads attention heads 2, 11 and 15 of layers 9, 12 and 13.
    "multilingual": {
        "t3": {
            **_TINY_LLAMA,
            "num_hidden_layers": 14,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "head_dim": 8,
        }
    },
}
TEXT_VOCAB = {"standard": 704, "multilingual": 2454}
# Multilingual spells each Chinese character as its Cangjie code, one token a letter (digits tell apart
# characters that share a code), then a marker.
CANGJIE_TOKENS = [f"[cj_{c}]" for c in string.ascii_lowercase + string.digits + "."]
SPECIALS = ["[STOP]", "[UNK]", "[SPACE]", "[PAD]", "[SEP]", "[CLS]", "[MASK]"]
CORPUS = [
    "Hello world. This is a random weight checkpoint for testing the speech server.",
    "The quick brown fox jumps over the lazy dog, again and again!",
    "Numbers like 3.14 and 42 are spoken too; so are questions? Yes.",
]


def char_tokenizer(vocab_size: int, extra_specials: list[str]) -> Any:
    """A character-level tokenizer with chatterbox's special tokens ([STOP]=0, [START]=255)."""
    from tokenizers import Tokenizer, models

    chars = [c for c in string.printable if not c.isspace()] + list("àáâäçèéêëìíîïñòóôöùúûüß")
    tokens = SPECIALS + extra_specials + chars
    tokens += [f"[unused{i}]" for i in range(255 - len(tokens))]
    vocab = {token: i for i, token in enumerate([*tokens[:255], "[START]", *tokens[255:]])}
    if len(vocab) > vocab_size:
        raise ValueError("vocabulary does not fit")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tokenizer.add_special_tokens([*SPECIALS, "[START]", *extra_specials])
    return tokenizer


def write_tokenizers(kind: str, out: Path) -> None:
    if kind == "turbo":
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
        bpe.add_tokens(sorted(server.PARALINGUISTIC_TAGS))  # Turbo's sound tags, added tokens as upstream's are
        bpe.save(str(out / "tokenizer.json"))
        config = {
            "tokenizer_class": "GPT2TokenizerFast",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "model_max_length": 1024,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    elif kind == "standard":
        char_tokenizer(TEXT_VOCAB[kind], []).save(str(out / "tokenizer.json"))
    else:
        langs = [f"[{code}]" for code in server.MULTILINGUAL_LANGUAGES]
        char_tokenizer(TEXT_VOCAB[kind], langs + CANGJIE_TOKENS).save(str(out / "grapheme_mtl_merged_expanded_v1.json"))
        _seed_cangjie_cache(out)


def _seed_cangjie_cache(out: Path) -> None:
    """The multilingual tokenizer fetches Cangjie5_TC.json through the hub cache in the
    checkpoint dir; pre-seed that cache layout so it is found offline. Every CJK unified ideograph
    gets a made-up code of one to five letters, as real Cangjie codes are (so Chinese text takes as
    many tokens as with the real table)."""
    repo = out / "models--ResembleAI--chatterbox"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    codes = [
        "".join(rng.choice(list("abcdefghijklmnopqrstuvwxy"), size=rng.integers(1, 6))) for _ in range(0x4E00, 0xA000)
    ]
    entries = [f"{chr(point)}\t{code}" for point, code in zip(range(0x4E00, 0xA000), codes)]
    (snapshot / "Cangjie5_TC.json").write_text(json.dumps(entries, ensure_ascii=False))


def reference_clip(seed: int, seconds: float = 8.0, rate: int = server.NATIVE_SAMPLE_RATE) -> np.ndarray:
    """A speech-like synthetic clip: a gliding harmonic tone with a syllable-rate envelope, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    clip = 0.2 * voiced * envelope + 0.01 * rng.standard_normal(len(t))
    return clip.astype(np.float32)


def save_state(module: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


def write_checkpoint(out: Path, kind: str, tiny: bool, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    arch: dict = {}
    if tiny:
        arch = {"model": kind, **TINY_ARCH[kind], "s3gen": _TINY_S3GEN, "voice_encoder_hidden": 64}
        (out / server.ARCH_FILE).write_text(json.dumps(arch, indent=1))
    torch.manual_seed(seed)
    parts = server.build_chatterbox(kind, arch)
    files = server.CHECKPOINT_FILES[kind]
    save_state(parts.ve, out / files["ve"])
    save_state(parts.t3, out / files["t3"])
    save_state(parts.s3gen, out / files["s3gen"])
    write_tokenizers(kind, out)

    for module in (parts.ve, parts.t3, parts.s3gen):
        module.eval()
    torch.manual_seed(seed)
    conds = server.clip_conditionals(
        parts, kind, "cpu", reference_clip(seed), server.NATIVE_SAMPLE_RATE, exaggeration=0.5
    )
    conds.save(out / "conds.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--model", choices=server.MODEL_KINDS, default="turbo")
    parser.add_argument("--tiny", action="store_true", help="shrink the model for fast tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_checkpoint(args.dir, args.model, args.tiny, args.seed)
    size = sum(p.stat().st_size for p in args.dir.rglob("*") if p.is_file())
    print(f"wrote {args.model}{' (tiny)' if args.tiny else ''} checkpoint to {args.dir} ({size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
