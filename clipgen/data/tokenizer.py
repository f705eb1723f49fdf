"""CLIP's byte-level BPE tokenizer, and small BPEs trained on shapes-world captions.

Both are built with the `tokenizers` library and the CLIP pipeline: NFC, whitespace
collapsed, lower case; CLIP's word regex; byte-level symbols; BPE whose word-final symbols
end in "</w>". Encoding adds the start and end tokens and truncates to the context length
keeping the end token last, as CLIP does.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from clipgen.data.json_input import (
    NUMBER,
    OBJECT,
    STR,
    Fields,
    either,
    list_of,
    optional,
    read_json_object,
)
from clipgen.errors import InputError

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


def _openai_layout_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Byte symbols, their word-final forms, one token per merge in order, start, end."""
    symbols = list(byte_symbols().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["".join(merge) for merge in merges] + [START, END]
    return {token: index for index, token in enumerate(tokens)}


_RESAVE = "fix it, or re-save the tokenizer with save_pretrained"


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: a pair of symbols a line ("#" lines are comments)."""
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path} cannot be read as UTF-8 text ({error}); {_RESAVE}") from None
    merges = []
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.startswith("#"):
            merge = tuple(line.split())
            if len(merge) != 2:
                raise InputError(f"{path}: line {number} is not a merge of two symbols; {_RESAVE}")
            merges.append(merge)
    return merges


def learn_merges(texts: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """BPE merges learnt from texts split as CLIP splits them: repeatedly merge the most
    frequent adjacent pair of symbols (ties: the smallest pair), until `num_merges` or no
    pair occurs twice."""
    splitter = _clip_pipeline(_bpe({START: 0, END: 1}, []))
    counts: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        normal = splitter.normalizer.normalize_str(text)
        for word, _ in splitter.pre_tokenizer.pre_tokenize_str(normal):
            if word not in (START, END):
                counts[(*word[:-1], word[-1] + "</w>")] += 1
    words = dict(counts)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:
            break
        merges.append(best)
        words = {_merge_pair(word, best): count for word, count in words.items()}
    return merges


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


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
        try:
            with gzip.open(path, "rt", encoding="utf-8") as file:
                lines = file.read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as error:
            raise InputError(
                f"{path} is not a readable gzipped BPE vocabulary ({type(error).__name__}: "
                f"{error}); re-download OpenAI's bpe_simple_vocab_16e6.txt.gz"
            ) from None
        merges = [tuple(line.split()) for line in lines[1 : max_merges + 1] if line.strip()]
        for number, merge in enumerate(merges, start=2):
            if len(merge) != 2:
                raise InputError(f"{path}: line {number} is not a merge of two symbols: {merge}")
        return cls(_clip_pipeline(_bpe(_openai_layout_vocab(merges), merges)), context_length)

    @classmethod
    def from_hf_directory(
        cls, path: str | Path, context_length: int | None = CONTEXT_LENGTH
    ) -> Tokenizer:
        """An HF CLIP tokenizer directory: `vocab.json` and `merges.txt`, or the
        `tokenizer.json` alone that transformers 5 writes (its BPE vocabulary and merges are
        read; the pipeline around them is CLIP's, as for the other sources). The pad token
        is `tokenizer_config.json`'s `pad_token` where it names one (Karlo's "!", id 0,
        which transformers then also matches whole in a text; its default is the end
        token), else id 0. `context_length` None takes the directory's `model_max_length`.
        A missing, damaged or inconsistent file raises an InputError naming it."""
        path = Path(path)
        config_path = path / "tokenizer_config.json"
        settings = Fields(
            read_json_object(config_path, "a tokenizer config", _RESAVE)
            if config_path.exists()
            else {},
            str(config_path),
            _RESAVE,
        )
        vocab_path, merges_path = path / "vocab.json", path / "merges.txt"
        if vocab_path.is_file() and merges_path.is_file():
            source = str(vocab_path)
            vocab = read_json_object(vocab_path, "a BPE vocabulary (token -> id)", _RESAVE)
            merges = _read_merges(merges_path)
        elif (path / "tokenizer.json").is_file():
            source = str(path / "tokenizer.json")
            tokenizer = Fields(
                read_json_object(path / "tokenizer.json", "a tokenizers file", _RESAVE),
                source,
                _RESAVE,
            )
            model = tokenizer.section("model")
            if model.raw("type") != "BPE":
                raise model.error(f"holds a {model.raw('type')!r} model, not BPE")
            vocab = model.get("vocab", {}, OBJECT)
            merges = [
                tuple(m.split()) if isinstance(m, str) else tuple(m)
                for m in model.get("merges", [], list_of(either(STR, list_of(STR))))
            ]
            bad = next((m for m in merges if len(m) != 2), None)
            if bad is not None:
                model.fail("merges", f"has {list(bad)!r}, not a pair of symbols")
        else:
            raise InputError(
                f"{path} holds neither vocab.json + merges.txt nor tokenizer.json (an HF CLIP "
                "tokenizer directory)"
            )
        ids = [v for v in vocab.values() if not (isinstance(v, int) and not isinstance(v, bool))]
        if ids or len(set(vocab.values())) != len(vocab):
            what = f"the id {ids[0]!r}, not an integer" if ids else "an id twice"
            raise InputError(f"{source}: the vocabulary holds {what}; {_RESAVE}")
        if context_length is None:
            length = settings.get("model_max_length", CONTEXT_LENGTH, NUMBER)
            if length < 2:
                settings.fail("model_max_length", f"is {length}; it must leave room for 2 tokens")
            context_length = int(min(length, 2**31 - 1))
        pad = settings.get("pad_token", None, optional(either(STR, OBJECT)))
        pad = pad.get("content") if isinstance(pad, dict) else pad
        try:
            backend = _clip_pipeline(_bpe(vocab, merges))
            if isinstance(pad, str) and pad in vocab and pad not in (START, END):
                backend.add_special_tokens([pad])  # as transformers: "!" in a text is the pad
            pad_id = vocab[pad] if isinstance(pad, str) and pad in vocab else 0
            return cls(backend, context_length, pad_id)
        except Exception as error:  # noqa: BLE001 - tokenizers' errors are not ValueErrors
            raise InputError(
                f"{path}: the tokenizer files do not make a CLIP BPE ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); {_RESAVE}"
            ) from None

    @classmethod
    def train(
        cls, texts: Iterable[str], num_merges: int = 200, context_length: int = 32
    ) -> Tokenizer:
        """A small CLIP-style BPE learnt from `texts` (the demo models use one learnt from
        shapes-world captions), in OpenAI's vocabulary layout. Deterministic: the most
        frequent pair is merged first, ties going to the smallest pair, so every process
        builds the same ids (the `tokenizers` trainer breaks ties differently per run)."""
        merges = learn_merges(texts, num_merges)
        return cls(_clip_pipeline(_bpe(_openai_layout_vocab(merges), merges)), context_length)

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
