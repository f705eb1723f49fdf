"""CLIP's byte-level BPE tokenizer, and small BPEs trained on shapes-world captions.

Both are built with the `tokenizers` library and the CLIP pipeline: NFC, whitespace
collapsed, lower case; CLIP's word regex; byte-level symbols; BPE whose word-final symbols
end in "</w>". Encoding adds the start and end tokens and truncates to the context length
keeping the end token last, as CLIP does.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

START = "<|startoftext|>"
END = "<|endoftext|>"
CONTEXT_LENGTH = 77
# The OpenAI vocabulary: 256 byte symbols, their word-final forms, merges, then 2 specials.
OPENAI_MERGES = 49152 - 256 - 2
WORD_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)


def byte_symbols() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters:
    printable Latin-1 bytes stand for themselves, the rest take code points from 256 up."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return symbols


def _clip_pipeline(model: models.BPE) -> Backend:
    backend = Backend(model)
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    # Whole special tokens in the text map to their ids, as in OpenAI's tokenizer.
    backend.add_special_tokens([START, END])
    return backend


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> models.BPE:
    return models.BPE(
        vocab=vocab,
        merges=merges,
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        unk_token=END,
        fuse_unk=False,
    )


class Tokenizer:
    """Texts to fixed-length id arrays: [start, tokens..., end, pad...]."""

    def __init__(self, backend: Backend, context_length: int = CONTEXT_LENGTH, pad_id: int = 0):
        if context_length < 2:
            raise ValueError(f"context_length must leave room for start and end: {context_length}")
        self.backend = backend
        self.context_length = context_length
        self.pad_id = pad_id
        self.start_id = self._special_id(START)
        self.end_id = self._special_id(END)

    def _special_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the vocabulary has no {token} token")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), both int32 (len(texts), context_length); the mask is 1 on the start,
        text and end tokens. Texts longer than the context are cut, the end token kept."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        ids = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(texts), self.context_length), dtype=np.int32)
        for row, encoding in enumerate(encodings):
            tokens = encoding.ids[: self.context_length - 2]
            sequence = [self.start_id, *tokens, self.end_id]
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        """The text of one id sequence, without special and pad tokens."""
        kept = [int(i) for i in ids if int(i) not in (self.start_id, self.end_id, self.pad_id)]
        return self.backend.decode(kept).replace("</w>", " ").strip()

    # -- construction ----------------------------------------------------------------

    @classmethod
    def from_bpe_vocab(
        cls, path: str | Path, context_length: int = CONTEXT_LENGTH, max_merges: int = OPENAI_MERGES
    ) -> Tokenizer:
        """OpenAI's `bpe_simple_vocab_16e6.txt.gz` (a header line, then one merge per line):
        the vocabulary is the byte symbols, their word-final forms, the merges in order, then
        the start and end tokens, which gives OpenAI CLIP's ids."""
        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : max_merges + 1] if line.strip()]
        for number, merge in enumerate(merges, start=2):
            if len(merge) != 2:
                raise ValueError(f"{path}: line {number} is not a merge of two symbols: {merge}")
        symbols = list(byte_symbols().values())
        tokens = symbols + [symbol + "</w>" for symbol in symbols]
        tokens += ["".join(merge) for merge in merges] + [START, END]
        vocab = {token: index for index, token in enumerate(tokens)}
        return cls(_clip_pipeline(_bpe(vocab, merges)), context_length)

    @classmethod
    def from_hf_directory(cls, path: str | Path, context_length: int = CONTEXT_LENGTH) -> Tokenizer:
        """An HF CLIP tokenizer directory: `vocab.json` and `merges.txt`."""
        path = Path(path)
        vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        lines = (path / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [
            tuple(line.split()) for line in lines if line.strip() and not line.startswith("#")
        ]
        return cls(_clip_pipeline(_bpe(vocab, merges)), context_length)

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 512, context_length: int = 32
    ) -> Tokenizer:
        """A small CLIP-style BPE trained on `texts` (the demo models use one trained on
        shapes-world captions)."""
        backend = _clip_pipeline(
            models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=END)
        )
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[START, END],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            end_of_word_suffix="</w>",
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend, context_length)

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as one JSON file (the backend plus the context length)."""
        data = {
            "backend": json.loads(self.backend.to_str()),
            "context_length": self.context_length,
            "pad_id": self.pad_id,
        }
        Path(path).write_text(json.dumps(data), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        backend = Backend.from_str(json.dumps(data["backend"]))
        return cls(backend, data["context_length"], data["pad_id"])
