"""Small real inputs for the training tests: a byte-level BPE tokenizer trained on the repo's sample text,
and a packed dataset (concatenate and chunk, position_ids restarting at each document) as artifacts."""

from __future__ import annotations

import json
import os

from tasks.artifacts import Artifact

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample_texts() -> list[str]:
    with open(os.path.join(REPO, "examples/data/stdlib_docstrings.jsonl")) as f:
        return [json.loads(line)["text"] for line in f]


def _as_artifact(path: str, stage: str, fp: str) -> Artifact:
    manifest = {"stage": stage, "fingerprint": fp, "rows": 0, "shards": [], "tables": {}}
    with open(os.path.join(path, "_manifest.json"), "w") as f:
        json.dump(manifest, f)
    return Artifact.open(path)


def make_tokenizer(directory: str, vocab_size: int = 384, bos: bool = False) -> Artifact:
    """`bos`: the tokenizer puts <|bos|> before every text, as a BERT tokenizer puts [CLS] (a classifier
    that pools the first token needs one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(sample_texts(), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    os.makedirs(directory, exist_ok=True)
    fast.save_pretrained(directory)
    return _as_artifact(directory, "tokenizer", "tok-test")


def make_packed(directory: str, tokenizer_dir: str, seq_len: int = 64, fp: str = "pack-test") -> Artifact:
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    ids: list[int] = []
    pos: list[int] = []
    for text in sample_texts():
        doc = tok(text)["input_ids"] + [tok.eos_token_id]
        ids += doc
        pos += list(range(len(doc)))
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        chunk = ids[start : start + seq_len]
        p = pos[start : start + seq_len]
        p = [x - p[0] if i < (p.index(0) if 0 in p else len(p)) else x for i, x in enumerate(p)]  # restart at 0
        rows["input_ids"].append(chunk)
        rows["labels"].append(list(chunk))
        rows["position_ids"].append(p)
    n_val = max(2, len(rows["input_ids"]) // 10)
    train = {k: v[n_val:] for k, v in rows.items()}
    val = {k: v[:n_val] for k, v in rows.items()}
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(train), "validation": datasets.Dataset.from_dict(val)}
    )
    os.makedirs(directory, exist_ok=True)
    dd.save_to_disk(os.path.join(directory, "hf"))
    return _as_artifact(directory, "pack", fp)


# the 1-layer Llama the pipeline tests train (random init, a few seconds a run on 2 CPU ranks)
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


CHARS = "abcdefghijklmnopqrstuvwxyz .,?!"


def make_char_policy(directory: str, seed: int = 0, hidden: int = 64) -> str:
    """A tiny random Llama over a character-level vocabulary (the letters, space and punctuation), saved
    with its tokenizer: a policy whose replies a rule can score letter by letter."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    os.makedirs(directory, exist_ok=True)
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def write_prompts(path: str, n: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    verbs = ["tell me", "write", "say", "describe", "name", "list", "show", "give me"]
    things = ["a story", "the sky", "some words", "a poem", "your day", "the sea", "a song", "a plan"]
    with open(path, "w") as f:
        for i in range(n):
            f.write(f"{rng.choice(verbs)} {rng.choice(things)} {i}\n")
    return path
