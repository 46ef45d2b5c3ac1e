"""A small byte-level BPE tokenizer trained on the fly, for tests that need real text."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "def generate(prompt, max_tokens=16):\n    return model(prompt)\n",
    "héllo wörld, naïve café — 日本語のテキスト 🙂 emoji ",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n",
    "Streaming detokenisation never splits a character. STOP here. ",
]
SPECIALS = ["<s>", "</s>", "<pad>"]
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2


def make_tokenizer(vocab_size: int = 300, add_bos: bool = True) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", BOS_ID)])
    return tok


def write_tokenizer(path: Path, vocab_size: int = 300, add_bos: bool = True) -> Path:
    make_tokenizer(vocab_size, add_bos).save(str(path))
    return path
