"""The CLIP tokenizer against transformers' CLIPTokenizer built from the same vocabulary."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
from transformers import CLIPTokenizer

from clipgen.data import shapes
from clipgen.data.tokenizer import END, START, Tokenizer, byte_symbols
from clipgen.errors import InputError

TEXTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "a small red circle to the left of a large blue square on a black background",
    "hello, world!",
    "don't stop believin'",
    "they're we've I'm you'll he'd it's",
    "3.14159 and 2,718 and 1e-9",
    "the year 2024 was 366 days long",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nmixed",
    "multiple     spaces    between words",
    "café naïve résumé",
    "Straße in München",
    "日本語のテキスト",
    "中文字符和标点。",
    "Привет, мир",
    "emoji 😀 🚀 ✨ test",
    "email@example.com and https://example.org/path?query=1",
    "#hashtag @mention $100 %50 ^caret &amp *star",
    "(parentheses) [brackets] {braces} <angles>",
    "semi;colon:colon/slash\\backslash|pipe",
    "quotes 'single' \"double\" `back`",
    "ellipsis... and dashes -- and — em dash",
    "!!!???...,,,",
    "a",
    "",
    "   ",
    "x" * 300,
    "word " * 100,
    "an orange triangle above a green diamond on a gray background",
    "ümlaut Ümlaut ÄÖÜ äöü",
    "ﬁ ligature and ½ fraction and ² superscript",
    "e\u0301 combining accent",
    "zero\u200bwidth space",
    "non\u00a0breaking space",
    "CamelCaseWordsTogether",
    "snake_case_words_here",
    "kebab-case-words-here",
    "numbers123mixed456",
    "1 2 3 4 5 6 7 8 9 0",
    "a <|startoftext|> b <|endoftext|> c",
    "it's a dog's life, isn't it?",
    "O'Reilly's book",
    "rock 'n' roll",
    "ALL CAPS SENTENCE HERE",
    "mIxEd CaSe",
    "Ελληνικά γράμματα",
    "עברית",
    "العربية",
    "हिन्दी",
    "한국어 텍스트",
    "a cat sitting on a mat, digital art, trending on artstation, 4k",
    "the quick brown fox jumps over the lazy dog " * 12,
    "🙂" * 40,
    " ".join(str(n) for n in range(100)),
]


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory):
    """A BPE vocabulary in OpenAI's bpe_simple_vocab format, and the same one as an HF
    tokenizer directory (vocab.json + merges.txt) derived from it by hand."""
    directory = tmp_path_factory.mktemp("vocab")
    corpus = [t.lower() for t in TEXTS] * 3 + [
        shapes.caption(shapes.sample_scene(np.random.default_rng(i))) for i in range(300)
    ]
    trained = Tokenizer.train(corpus, num_merges=600)
    merges = json.loads(trained.backend.to_str())["model"]["merges"]
    merges = [m.split() if isinstance(m, str) else m for m in merges]
    gz = directory / "bpe_simple_vocab.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as file:
        file.write("#version: test\n" + "\n".join(" ".join(m) for m in merges) + "\n")

    symbols = list(byte_symbols().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += [START, END]
    hf = directory / "hf"
    hf.mkdir()
    (hf / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (hf / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    assert len(merges) > 300
    return gz, hf


def test_ids_equal_transformers_clip_tokenizer(vocab_files):
    gz, hf = vocab_files
    ours = Tokenizer.from_bpe_vocab(gz)
    reference = CLIPTokenizer.from_pretrained(hf)
    ids, mask = ours.encode(TEXTS)
    expected = reference(TEXTS, truncation=True, max_length=77, padding="max_length")
    for row, text in enumerate(TEXTS):
        length = int(mask[row].sum())
        want = expected["input_ids"][row]
        want = want[: int(np.sum(expected["attention_mask"][row]))]
        assert ids[row, :length].tolist() == want, text
    assert len(TEXTS) >= 50
    truncated = [i for i, text in enumerate(TEXTS) if mask[i].sum() == 77]
    assert len(truncated) >= 3  # long texts are cut, keeping the end token
    assert all(ids[i, 76] == ours.end_id for i in truncated)


def test_hf_directory_gives_the_same_tokenizer(vocab_files):
    gz, hf = vocab_files
    a, _ = Tokenizer.from_bpe_vocab(gz).encode(TEXTS)
    b, _ = Tokenizer.from_hf_directory(hf).encode(TEXTS)
    np.testing.assert_array_equal(a, b)


def test_layout_padding_decoding_and_saving(vocab_files, tmp_path):
    gz, _ = vocab_files
    tokenizer = Tokenizer.from_bpe_vocab(gz, context_length=16)
    ids, mask = tokenizer.encode(["a small red circle", ""])
    assert ids.shape == (2, 16) and ids.dtype == np.int32
    assert ids[0, 0] == tokenizer.start_id and ids[1].tolist()[:3] == [
        tokenizer.start_id,
        tokenizer.end_id,
        0,
    ]
    assert mask[1].tolist() == [1, 1] + [0] * 14
    assert tokenizer.decode(ids[0]) == "a small red circle"
    tokenizer.save(tmp_path / "tok.json")
    again = Tokenizer.load(tmp_path / "tok.json")
    np.testing.assert_array_equal(again.encode(TEXTS)[0], tokenizer.encode(TEXTS)[0])


def test_shapes_tokenizer_learns_whole_caption_words():
    captions = [shapes.caption(shapes.sample_scene(np.random.default_rng(i))) for i in range(500)]
    tokenizer = Tokenizer.train(captions, num_merges=200, context_length=24)
    ids, mask = tokenizer.encode(captions)
    # Every caption word becomes one token: start + words + end.
    np.testing.assert_array_equal(mask.sum(1), [len(c.split()) + 2 for c in captions])
    assert [tokenizer.decode(row) for row in ids[:20]] == captions[:20]


def test_bad_vocab_file_fails_naming_the_line(tmp_path):
    path = tmp_path / "bad.txt.gz"
    with gzip.open(path, "wt") as file:
        file.write("#version\na b\nc d e\n")
    with pytest.raises(ValueError, match="line 3"):
        Tokenizer.from_bpe_vocab(path)


def test_training_gives_the_same_tokenizer_in_every_process():
    # The ids a model was trained with must come back in the process that embeds with it.
    script = (
        "from clipgen.data.tokenizer import Tokenizer; import sys; "
        "t = Tokenizer.train(sys.argv[1:], num_merges=50); print(t.backend.to_str())"
    )
    captions = [shapes.caption(shapes.sample_scene(np.random.default_rng(i))) for i in range(50)]
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script, *captions], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(3)
    }
    assert len(outputs) == 1
    assert outputs.pop().strip() == Tokenizer.train(captions, num_merges=50).backend.to_str()


@pytest.mark.parametrize("pad_token", ["!", END])
def test_tokenizer_json_alone_gives_the_ids_and_padding_of_transformers(
    vocab_files, tmp_path, pad_token
):
    """transformers 5 saves a CLIPTokenizer as tokenizer.json (+ tokenizer_config.json)
    only; its vocabulary, merges, pad token and length are read from there (Karlo pads
    with "!", id 0; transformers' default pad is the end token)."""
    _, hf = vocab_files
    reference = CLIPTokenizer.from_pretrained(hf, model_max_length=77, pad_token=pad_token)
    reference.save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists() and (tmp_path / "tokenizer.json").exists()
    ours = Tokenizer.from_hf_directory(tmp_path, None)
    assert ours.context_length == 77 and ours.pad_id == reference.pad_token_id
    ids, mask = ours.encode(TEXTS)
    expected = reference(TEXTS, truncation=True, max_length=77, padding="max_length")
    np.testing.assert_array_equal(ids, np.asarray(expected["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(expected["attention_mask"]))
    with pytest.raises(InputError, match="tokenizer.json"):
        Tokenizer.from_hf_directory(tmp_path / "missing")
