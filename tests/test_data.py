"""Offline data sources: text corpora, IDX files, image folders, digits. CPU only, no network."""

from __future__ import annotations

import gzip
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from replacer.data import (
    FASHION_MNIST_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TEXT_SOURCES,
    DataError,
    bible_sentences,
    IdxImageDataset,
    ImageFolderDataset,
    digits_dataset,
    docstring_sentences,
    fortune_parts,
    fortune_sentences,
    hf_dataset_texts,
    is_prose,
    jsonl_texts,
    load_texts,
    prose_sentences,
    read_idx,
    split_sentences,
    split_texts,
    text_file_lines,
    wordnet_sentences,
)
from replacer.errors import ReplacerError
from helpers import write_idx

REAL_WORDNET = Path("/usr/share/wordnet/data.noun").is_file()
REAL_FORTUNES = Path("/usr/share/games/fortunes/fortunes").is_file()
REAL_BIBLE = Path("/usr/share/sword/modules/texts/ztext/engWEB2015eb/nt.bzs").is_file()


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and isinstance(exc.value, ReplacerError)
    return message


# --- prose filter and docstrings --------------------------------------------------------------------


def test_is_prose_rules():
    assert is_prose("Return the number of items in the container.")
    assert not is_prose("Too short to count.")
    assert not is_prose("lowercase start is not a sentence, even if it is long enough.")
    assert not is_prose("Example of a doctest follows here >>> print(1 + 2) and more words.")
    assert not is_prose("This sentence has no terminal punctuation at all so it is a fragment")
    assert not is_prose("Values 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 are numbers.")
    assert not is_prose("A" * 301 + ".")


def test_split_sentences_collapses_whitespace():
    assert split_sentences("First one here.\n  Second   one? Third!  e.g. lower") == [
        "First one here.", "Second one?", "Third! e.g. lower",
    ]


@pytest.fixture(scope="module")
def docstrings_seed0() -> list[str]:
    return docstring_sentences(limit=200, seed=0)


def test_docstring_sentences_are_distinct_prose(docstrings_seed0):
    assert len(docstrings_seed0) == len(set(docstrings_seed0)) == 200
    for sentence in docstrings_seed0:
        assert 30 <= len(sentence) <= 300 and sentence[0].isupper()
        assert ">>>" not in sentence and "::" not in sentence
        assert sum(c.isalpha() or c == " " for c in sentence) >= 0.75 * len(sentence)
        assert is_prose(sentence)


def test_docstring_sentences_deterministic_per_seed(docstrings_seed0):
    assert docstring_sentences(limit=200, seed=0) == docstrings_seed0
    other = docstring_sentences(limit=200, seed=1)
    assert other != docstrings_seed0


# --- WordNet ----------------------------------------------------------------------------------------

WORDNET_HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"


def make_wordnet(root: Path) -> Path:
    root.mkdir()
    (root / "data.noun").write_text(
        WORDNET_HEADER
        + '00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred to have '
        'its own distinct existence (living or nonliving)  \n'
        + '00002137 03 n 02 abstraction 0 | a general concept formed by extracting common features; "the '
        'cat sat on the mat in the sun"; "he spoke at great length about the weather"  \n'
    )
    (root / "data.verb").write_text('00001740 29 v 01 breathe 0 | draw air into, and expel out of, the lungs  \n')
    return root


def test_wordnet_parses_glosses_and_examples(tmp_path):
    sentences = wordnet_sentences(make_wordnet(tmp_path / "wn"), seed=0)
    assert sorted(sentences) == sorted([
        "That which is perceived or known or inferred to have its own distinct existence (living or nonliving).",
        "A general concept formed by extracting common features.",
        "The cat sat on the mat in the sun.",
        "He spoke at great length about the weather.",
        "Draw air into, and expel out of, the lungs.",
    ])
    assert not any("LICENSEE" in s for s in sentences)
    assert wordnet_sentences(tmp_path / "wn", limit=2, seed=3) == wordnet_sentences(tmp_path / "wn", seed=3)[:2]


def test_wordnet_parts_are_parts_of_speech(tmp_path):
    root = make_wordnet(tmp_path / "wn")
    assert wordnet_sentences(root, parts=["verb"]) == ["Draw air into, and expel out of, the lungs."]
    assert len(wordnet_sentences(root, parts=["noun"])) == 4
    with pytest.raises(DataError, match="wordnet has no part 'verbs' .did you mean 'verb'.*choose from noun, verb, adj, adv"):
        wordnet_sentences(root, parts=["verbs"])


def test_wordnet_missing_dir(tmp_path):
    with pytest.raises(DataError) as exc:
        wordnet_sentences(tmp_path / "nowhere")
    assert "WordNet not found at" in one_line(exc) and "apt-get install wordnet-base" in str(exc.value)


@pytest.mark.skipif(not REAL_WORDNET, reason="Debian package wordnet-base not installed")
def test_real_wordnet():
    sentences = wordnet_sentences(limit=500, seed=0)
    assert len(sentences) == 500 and all(is_prose(s) for s in sentences)


# --- fortunes ---------------------------------------------------------------------------------------


def make_fortunes(root: Path) -> Path:
    (root / "off").mkdir(parents=True)
    (root / "wisdom").write_text(
        "A journey of a thousand miles begins with a single step.\n%\nShort.\n%\n"
        "Two lines of\n   wisdom that   belong together in one entry.\n%\n"
    )
    (root / "wisdom.dat").write_bytes(b"\x00\x00\x00\x02 binary index that is not text at all, skipped")
    (root / "wisdom.u8").write_text("This UTF-8 twin duplicates an entry and must be skipped.\n%\n")
    (root / "off" / "rude").write_text("An offensive entry lives here and must never be read.\n%\n")
    return root


def test_fortunes_parse_entries(tmp_path):
    entries = fortune_sentences(make_fortunes(tmp_path / "fortunes"))
    assert sorted(entries) == [
        "A journey of a thousand miles begins with a single step.",
        "Two lines of wisdom that belong together in one entry.",
    ]


def test_fortune_parts_read_only_the_named_files(tmp_path):
    root = make_fortunes(tmp_path / "fortunes")
    (root / "songs-poems").write_text("Roses are red and violets are blue, sugar is sweet.\n%\n")
    assert fortune_parts(root) == ["songs-poems", "wisdom"]
    assert fortune_sentences(root, parts=["songs-poems"]) == ["Roses are red and violets are blue, sugar is sweet."]
    assert sorted(fortune_sentences(root, parts=["wisdom", "songs-poems"])) == sorted(fortune_sentences(root))
    with pytest.raises(DataError) as exc:
        fortune_sentences(root, parts=["songs-poem"])
    assert one_line(exc) == "fortunes has no part 'songs-poem' (did you mean 'songs-poems'?): choose from songs-poems, wisdom"
    with pytest.raises(DataError, match="parts of fortunes are an empty list"):
        fortune_sentences(root, parts=[])


def test_fortunes_missing_dir(tmp_path):
    with pytest.raises(DataError) as exc:
        fortune_sentences(tmp_path / "nowhere")
    assert one_line(exc).startswith(f"fortunes not found at {tmp_path / 'nowhere'}: install the Debian package `fortunes`")


@pytest.mark.skipif(not REAL_FORTUNES, reason="Debian package fortunes not installed")
def test_real_fortunes():
    entries = fortune_sentences(limit=300, seed=0)
    assert len(entries) == 300 and all(30 <= len(e) <= 300 for e in entries)
    assert fortune_sentences(limit=300, seed=0) == entries


def make_ztext(root: Path, books: list[str]) -> Path:
    """A SWORD zText module: one zlib block per book, indexed by (offset, size, plain size)."""
    root.mkdir(parents=True)
    index, data = b"", b""
    for book in books:
        block = zlib.compress(book.encode())
        index += struct.pack("<III", len(data), len(block), len(book.encode()))
        data += block
    (root / "nt.bzs").write_bytes(index + struct.pack("<III", len(data), 0, 0))  # an empty trailing entry
    (root / "nt.bzz").write_bytes(data)
    return root


OSIS_BOOK = (
    '<div type="book"><title>The Good News</title><chapter osisID="X.1"/>'
    '<w lemma="strong:G1">In</w> the beginning was the <w lemma="strong:G2">Word</w>.'
    '<note placement="foot">Some manuscripts read otherwise and this note is not prose.</note> '
    'He said, <q marker="\u201c">\u201c Come and see what is written here! \u201d</q> Short. '
    "The children of Israel didn\u2019t forget the covenant of their fathers.</div>"
)


def test_bible_reads_ztext_blocks_and_strips_osis(tmp_path):
    texts = bible_sentences(make_ztext(tmp_path / "web", [OSIS_BOOK, "<div>Another book stands in its own block here.</div>"]))
    assert sorted(texts) == [
        "Another book stands in its own block here.",
        'He said, "Come and see what is written here!" Short.',
        "In the beginning was the Word.",
        "The children of Israel didn't forget the covenant of their fathers.",
    ]


def test_bible_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError) as exc:
        bible_sentences(tmp_path / "nowhere")
    assert "install the Debian package `sword-text-web`" in one_line(exc)
    root = make_ztext(tmp_path / "web", [OSIS_BOOK])
    (root / "nt.bzz").write_bytes(b"not zlib data at all" * 10)
    with pytest.raises(DataError) as exc:
        bible_sentences(root)
    assert "is corrupt at offset 0" in one_line(exc)


@pytest.mark.skipif(not REAL_BIBLE, reason="Debian package sword-text-web not installed (scripts/install.sh installs it)")
def test_real_bible():
    texts = bible_sentences(limit=500, seed=0)
    assert len(texts) == 500 and all(is_prose(t) for t in texts)
    assert not any("<" in t or "strong:" in t for t in texts)
    assert load_texts("bible", limit=500, seed=0) == texts


# --- files, JSON lines, Hugging Face, dispatch ------------------------------------------------------


def test_text_file_lines(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first line\n\n  second line  \n")
    b.write_text("third line\nfirst line\n")
    assert sorted(text_file_lines([a, str(b)])) == ["first line", "second line", "third line"]
    assert len(text_file_lines([a, b], limit=2)) == 2


def test_text_file_errors(tmp_path):
    with pytest.raises(DataError) as exc:
        text_file_lines([tmp_path / "missing.txt"])
    assert "text file not found" in one_line(exc) and "missing.txt" in str(exc.value)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        text_file_lines([tmp_path / "latin1.txt"])
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no text in"):
        text_file_lines([tmp_path / "blank.txt"])


def test_prose_files_join_wrapped_lines_into_sentences(tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "one.txt").write_text(
        "The licence is granted to\nanyone who asks for it politely.  It may be\nrevoked at any time.\n\n"
        "  SECTION 2\n\nNo warranty of any kind is given by the authors here.\n"
    )
    (tmp_path / "book" / "two.md").write_text("A second file holds one more sentence of plain prose.\n")
    assert sorted(prose_sentences(str(tmp_path / "book" / "*"))) == [
        "A second file holds one more sentence of plain prose.",
        "It may be revoked at any time.",
        "No warranty of any kind is given by the authors here.",
        "The licence is granted to anyone who asks for it politely.",
    ]
    assert load_texts(f"prose:{tmp_path / 'book' / 'two.md'}") == ["A second file holds one more sentence of plain prose."]
    with pytest.raises(DataError, match="no file matches"):
        prose_sentences(str(tmp_path / "nothing" / "*"))


def test_match_keeps_matching_texts_before_the_limit(tmp_path):
    lines = _write(tmp_path / "t.txt", "no digits here\n3 apples and 4 pears\nanother plain one\n12 kg of flour\n")
    assert sorted(load_texts(f"file:{lines}", match=r"\d")) == ["12 kg of flour", "3 apples and 4 pears"]
    assert len(load_texts(f"file:{lines}", match=r"\d", limit=1)) == 1
    assert load_texts(f"file:{lines}", match=r"\d", limit=1, seed=2) == load_texts(f"file:{lines}", match=r"\d", seed=2)[:1]
    with pytest.raises(DataError, match="no text of file:.* matches 'zebra'"):
        load_texts(f"file:{lines}", match="zebra")
    with pytest.raises(DataError, match="is not a regular expression"):
        load_texts(f"file:{lines}", match="([")
    with pytest.raises(DataError, match="text source 'file:.*' has no parts: parts apply to wordnet, fortunes"):
        load_texts(f"file:{lines}", parts=["a"])


def test_passages_join_consecutive_texts_of_one_document(tmp_path):
    from replacer.data.text import passages

    texts = [f"Sentence number {i} of the file." for i in range(10)]  # 30 characters each, 31 with a space
    joined = list(passages(texts, 100))
    assert joined == [" ".join(texts[0:4]), " ".join(texts[4:8]), " ".join(texts[8:10])]  # a tail of 62 > 50 stays
    assert list(passages(texts[:9], 100)) == joined[:2]  # a tail of 31 < 50 characters is dropped
    a = _write(tmp_path / "a.txt", "\n".join(f"Line {i} of the first file, which is long enough." for i in range(6)))
    b = _write(tmp_path / "b.txt", "\n".join(f"Line {i} of the second file, which is long enough." for i in range(6)))
    found = load_texts(f"file:{tmp_path}/a.txt", passage_chars=150)
    assert sorted(found) == sorted(passages(a.read_text().splitlines(), 150))
    both = text_file_lines([a, b], passage_chars=150)  # passages never cross from one file into the next
    assert all(("first" in p) != ("second" in p) for p in both) and len(both) == 4
    assert text_file_lines([a, b], passage_chars=150, seed=3) == text_file_lines([a, b], passage_chars=150, seed=3)
    with pytest.raises(DataError, match="passage_chars must be a positive whole number"):
        text_file_lines([a], passage_chars=0)


def test_fortune_and_bible_passages_stay_within_their_file_or_block(tmp_path):
    root = make_fortunes(tmp_path / "fortunes")
    (root / "songs-poems").write_text("Roses are red and violets are blue, sugar is sweet.\n%\nThe second verse is sung a little louder.\n%\n")
    joined = fortune_sentences(root, passage_chars=60)
    assert sorted(joined) == sorted([
        "A journey of a thousand miles begins with a single step. Two lines of wisdom that belong together in one entry.",
        "Roses are red and violets are blue, sugar is sweet. The second verse is sung a little louder.",
    ])
    web = make_ztext(tmp_path / "web", [OSIS_BOOK, "<div>Another book stands in its own block here.</div>"])
    assert sorted(bible_sentences(web, passage_chars=80)) == [  # the last verse of a block does not run into the next
        "Another book stands in its own block here.",
        'In the beginning was the Word. He said, "Come and see what is written here!" Short.',
        "The children of Israel didn't forget the covenant of their fathers.",
    ]


def test_jsonl_texts(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "hello world", "body": "x"}) + "\n\n" + json.dumps({"text": "bye", "body": "y"}) + "\n")
    assert sorted(jsonl_texts(path)) == ["bye", "hello world"]
    assert sorted(jsonl_texts(path, field="body")) == ["x", "y"]


def test_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError) as exc:
        jsonl_texts(bad)
    assert "line 2 is not valid JSON" in one_line(exc)
    with pytest.raises(DataError) as exc:
        jsonl_texts(_write(tmp_path / "f.jsonl", '{"a": 1}\n'))
    assert "line 1 has no field 'text'" in one_line(exc)
    with pytest.raises(DataError, match="is a int, not a string"):
        jsonl_texts(_write(tmp_path / "n.jsonl", '{"text": 3}\n'))
    with pytest.raises(DataError, match="text file not found"):
        jsonl_texts(tmp_path / "absent.jsonl")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError) as exc:
        hf_dataset_texts("wikitext", split="train")
    assert "`datasets` package is not installed" in one_line(exc)
    with pytest.raises(DataError, match="not installed"):
        load_texts("hf:wikitext", limit=10, seed=0, split="train")


def test_load_texts_dispatch(tmp_path):
    assert set(TEXT_SOURCES) == {"docstrings", "wordnet", "fortunes", "bible"}
    lines = _write(tmp_path / "t.txt", "alpha\nbeta\ngamma\n")
    assert load_texts(f"file:{lines}", limit=None, seed=0) == text_file_lines([lines], seed=0)
    records = _write(tmp_path / "t.jsonl", '{"body": "alpha"}\n{"body": "beta"}\n')
    assert sorted(load_texts(f"jsonl:{records}", limit=None, seed=0, field="body")) == ["alpha", "beta"]
    wordnet = make_wordnet(tmp_path / "wn")
    assert load_texts("wordnet", limit=3, seed=1, root=wordnet) == wordnet_sentences(wordnet, limit=3, seed=1)


def test_load_texts_unknown_source():
    with pytest.raises(DataError) as exc:
        load_texts("wikipedia", limit=10, seed=0)
    message = one_line(exc)
    assert "unknown text source 'wikipedia'" in message
    assert all(form in message for form in ("docstrings", "wordnet", "fortunes", "file:PATH", "prose:GLOB", "jsonl:PATH", "hf:NAME"))


def test_limit_validation():
    with pytest.raises(DataError, match="limit must be"):
        load_texts("docstrings", limit=0, seed=0)


# --- splitting --------------------------------------------------------------------------------------


def test_split_texts_deterministic_and_disjoint():
    texts = [f"text {i}" for i in range(50)]
    train, held = split_texts(texts, 0.2, seed=4)
    assert len(held) == 10 and len(train) == 40
    assert not set(train) & set(held) and set(train) | set(held) == set(texts)
    assert split_texts(texts, 0.2, seed=4) == (train, held)
    assert split_texts(texts, 0.2, seed=5) != (train, held)
    assert len(split_texts(texts, 7, seed=0)[1]) == 7


def test_split_texts_errors():
    with pytest.raises(DataError, match="outside"):
        split_texts(["a", "b"], 1.5, seed=0)
    with pytest.raises(DataError, match="both parts must be non-empty"):
        split_texts(["a", "b"], 2, seed=0)


# --- IDX --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip(tmp_path, dtype, compress):
    array = np.arange(-12, 12).reshape(2, 3, 4) if dtype != "u1" else np.arange(24).reshape(2, 3, 4)
    back = read_idx(write_idx(tmp_path / "x.idx", array, dtype, compress))
    assert back.shape == (2, 3, 4) and back.dtype.isnative
    np.testing.assert_array_equal(back, array.astype(dtype))


def test_read_idx_corrupt(tmp_path):
    path = write_idx(tmp_path / "x.idx", np.zeros((4, 5, 5)), "u1")
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError) as exc:
        read_idx(path)
    assert "truncated or corrupt" in one_line(exc) and str(path) in str(exc.value)
    gz = tmp_path / "x.idx.gz"
    gz.write_bytes(gzip.compress(b"\0\0\x08\x01" + struct.pack(">I", 10) + bytes(10))[:-6])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        read_idx(gz)
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    with pytest.raises(DataError, match="IDX file not found"):
        read_idx(tmp_path / "absent")


def make_fashion_folder(folder: Path, count: int = 12, classes: int = 10) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, compress in (("train", True), ("t10k", False)):
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (count, 5, 4)), "u1", compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(count) % classes, "u1", compress)
    return folder


def test_idx_image_dataset(tmp_path):
    folder = make_fashion_folder(tmp_path / "fm")
    train = IdxImageDataset(folder, split="train")
    image, label = train[3]
    assert len(train) == 12 and image.shape == (1, 5, 4) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and label == 3
    assert train.num_classes == 10 and train.classes == list(FASHION_MNIST_CLASSES)
    assert len(IdxImageDataset(folder, split="test", limit=2)) == 2
    raw = read_idx(folder / "t10k-images-idx3-ubyte")
    torch.testing.assert_close(IdxImageDataset(folder, split="test")[1][0][0], torch.from_numpy(raw[1]).float() / 255)


def test_idx_image_dataset_class_names_follow_label_count(tmp_path):
    dataset = IdxImageDataset(make_fashion_folder(tmp_path / "fm", classes=3))
    assert dataset.num_classes == 3 and dataset.classes == ["0", "1", "2"]


def test_idx_image_dataset_errors(tmp_path):
    with pytest.raises(DataError) as exc:
        IdxImageDataset(tmp_path / "none")
    assert one_line(exc).startswith(f"Fashion-MNIST not found at {tmp_path / 'none'}")
    assert "apt-get install dataset-fashion-mnist" in str(exc.value)
    with pytest.raises(DataError, match="unknown split"):
        IdxImageDataset(make_fashion_folder(tmp_path / "fm"), split="validation")


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist():
    dataset = IdxImageDataset(split="test", limit=100)
    image, label = dataset[0]
    assert len(dataset) == 100 and image.shape == (1, 28, 28) and dataset.num_classes == 10 and 0 <= label < 10


# --- image folders ----------------------------------------------------------------------------------


def make_image_folder(root: Path) -> Path:
    sizes = {"cat": [(37, 23), (20, 41)], "dog": [(31, 31), (45, 19)]}
    for index, (name, shapes) in enumerate(sorted(sizes.items())):
        (root / name).mkdir(parents=True)
        for (w, h), filename in zip(shapes, ("img0.png", "img1.PNG")):  # extensions match case-insensitively
            Image.new("RGB", (w, h), (255 * index, 128, 0)).save(root / name / filename)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_dataset(tmp_path):
    dataset = ImageFolderDataset(make_image_folder(tmp_path / "imgs"), image_size=16)
    assert dataset.classes == ["cat", "dog"] and dataset.num_classes == 2 and len(dataset) == 4
    assert [label for _, label in dataset.samples] == [0, 1, 0, 1]  # round-robin across classes
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    cat, _ = dataset[0]  # solid (0, 128, 0) image: every pixel normalises to the same value
    expected = [(v / 255 - m) / s for v, m, s in zip((0, 128, 0), IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(cat.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-3, rtol=0)
    assert len(ImageFolderDataset(tmp_path / "imgs", image_size=8, limit=3)) == 3
    plain = ImageFolderDataset(tmp_path / "imgs", image_size=8, mean=(0, 0, 0), std=(1, 1, 1), resize_size=10)[1][0]
    assert plain.shape == (3, 8, 8) and torch.allclose(plain[0], torch.ones(8, 8))


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError) as exc:
        ImageFolderDataset(tmp_path / "none")
    assert "image folder not found at" in one_line(exc) and "root/<class>/<image>" in str(exc.value)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class folders in"):
        ImageFolderDataset(tmp_path / "flat")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in the class folders"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "broken" / "cls").mkdir(parents=True)
    (tmp_path / "broken" / "cls" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot read image"):
        ImageFolderDataset(tmp_path / "broken")[0]


# --- digits -----------------------------------------------------------------------------------------


def test_digits_dataset():
    pytest.importorskip("sklearn")
    train, test = digits_dataset("train", seed=0), digits_dataset("test", seed=0)
    assert len(train) + len(test) == 1797 and len(test) == 1797 // 5
    image, label = train[0]
    assert image.shape == (1, 8, 8) and 0 <= image.min() and image.max() <= 1 and label.dtype == torch.int64
    torch.testing.assert_close(digits_dataset("test", seed=0).tensors[0], test.tensors[0])
    assert not torch.equal(digits_dataset("test", seed=1).tensors[1], test.tensors[1])


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match="scikit-learn is not installed"):
        digits_dataset()

