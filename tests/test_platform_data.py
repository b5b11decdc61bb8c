"""Corpora, tokenizers, the memory-mapped token cache and the deterministic, rank-sharded batches."""

import json
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from sparta.platform.data import (
    TOKENIZER_PATH,
    Prefetched,
    TokenBatches,
    check_corpus,
    load_tokenizer,
    open_corpus,
    prepare_corpus,
    resolve_corpus,
    train_tokenizer,
)


def test_tokenizer_round_trips_any_text():
    tokenizer = load_tokenizer()
    assert tokenizer.get_vocab_size() == 2048
    text = 'def f(x):\n    return x ** 2  # naïve — 数学 ✓\n'
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_shipped_tokenizer_is_reproducible_from_the_shipped_corpus():
    retrained = train_tokenizer(text for _, text, _ in resolve_corpus("python_docs").documents())
    shipped = json.loads(TOKENIZER_PATH.read_text())
    assert json.loads(retrained.to_str())["model"]["vocab"] == shipped["model"]["vocab"]


def test_python_docs_uses_the_shipped_tokenizer_and_splits_whole_documents(tmp_path):
    directory = prepare_corpus("python_docs", 2048, 0.1, "uint16", tmp_path, progress=False)
    assert (directory / "tokenizer.json").read_bytes() == TOKENIZER_PATH.read_bytes()
    corpus = open_corpus(directory)
    p = corpus.params
    assert p["data.documents"] > 50 and p["data.bytes"] > 400_000 and p["data.files"] == 1
    assert 0.05 < len(corpus.val) / (len(corpus.train) + len(corpus.val)) < 0.2
    assert corpus.train[-1] == corpus.val[-1] == corpus.eot_id  # both splits end with a whole document


def texts_of(tokens, corpus):
    """The documents in a split: the text between end-of-text tokens."""
    tokenizer = load_tokenizer(corpus.directory / "tokenizer.json")
    ends = np.flatnonzero(np.asarray(tokens) == corpus.eot_id)
    return [tokenizer.decode(tokens[a:b].tolist()) for a, b in zip([0, *(ends[:-1] + 1)], ends)]


@pytest.fixture
def user_corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    docs = {f"story {i}: " + "the cat sat on the mat. " * (i % 7 + 1) for i in range(60)}
    docs = sorted(docs)
    (root / "a.txt").write_text(docs[0] + "<|endoftext|> is text here")
    (root / "sub" / "b.txt").write_text(docs[1])
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[2:])) + "\n")
    (root / "notes.md").write_text("not read")
    return root, [docs[0] + "<|endoftext|> is text here", docs[1], *docs[2:]]


def test_user_corpus_becomes_memmapped_whole_documents(tmp_path, user_corpus):
    root, docs = user_corpus
    directory = prepare_corpus(str(root), 300, 0.2, "uint16", tmp_path / "cache", progress=False)
    corpus = open_corpus(directory)
    assert isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.uint16 and not corpus.train.flags.writeable
    assert corpus.vocab_size == 300 and corpus.train.max() < 300
    train, val = texts_of(corpus.train, corpus), texts_of(corpus.val, corpus)
    # eot after every document, each document whole in exactly one split; a literal "<|endoftext|>" is text
    assert sorted(train + val) == sorted(docs)
    assert 0.1 < len(val) / len(docs) < 0.3
    assert set(val) != set(docs[: len(val)])  # spread over the corpus, not its first documents
    p = corpus.params
    assert p["data.files"] == 3 and p["data.documents"] == len(docs) == p["data.train_documents"] + p["data.val_documents"]
    assert p["data.train_tokens"] == len(corpus.train) and "data.python_version" not in p
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["corpus"] == str(root) and meta["token_dtype"] == "uint16" and meta["vocab_size"] == 300


def test_cache_is_reused_and_rebuilt_when_the_corpus_or_settings_change(tmp_path, user_corpus, monkeypatch):
    root, _ = user_corpus
    cache = tmp_path / "cache"
    first = prepare_corpus(str(root), 300, 0.2, "uint16", cache, progress=False)
    stamp = [(first / f).stat().st_mtime_ns for f in ("train.bin", "val.bin", "meta.json")]
    monkeypatch.chdir(tmp_path)  # the same files through a relative glob: the same cache, not rebuilt
    assert prepare_corpus("corpus/**/*.*", 300, 0.2, "uint16", cache, progress=False) == first
    assert [(first / f).stat().st_mtime_ns for f in ("train.bin", "val.bin", "meta.json")] == stamp
    assert open_corpus(first).params["data.files"] == 3
    other_vocab = prepare_corpus(str(root), 320, 0.2, "uint16", cache, progress=False)
    wide = prepare_corpus(str(root), 300, 0.2, "uint32", cache, progress=False)
    assert open_corpus(wide).train.dtype == np.uint32
    (root / "sub" / "b.txt").write_text("a changed document")
    changed = prepare_corpus(str(root), 300, 0.2, "uint16", cache, progress=False)
    assert len({first, other_vocab, wide, changed}) == 4
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in (first, other_vocab, wide, changed))


def test_concurrent_preparers_share_one_cache(tmp_path, user_corpus):
    root, _ = user_corpus
    with ThreadPoolExecutor(2) as pool:
        dirs = list(pool.map(lambda _: prepare_corpus(str(root), 300, 0.2, "uint16", tmp_path, progress=False), range(2)))
    assert dirs[0] == dirs[1] and [p.name for p in tmp_path.iterdir() if p.name != "corpus"] == [dirs[0].name]
    assert open_corpus(dirs[0]).params["data.documents"] == 60


def test_tiny_corpus_still_gets_a_val_document(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("first document")
    (tmp_path / "two.txt").write_text("second document")
    corpus = open_corpus(prepare_corpus(str(tmp_path / "*.txt"), 257, 0.01, "uint16", tmp_path / "cache"))
    assert corpus.params["data.train_documents"] == corpus.params["data.val_documents"] == 1
    assert "tokenizing" in capsys.readouterr().err  # the progress bar
    (tmp_path / "two.txt").unlink()
    with pytest.raises(ValueError, match="1 document"):
        prepare_corpus(str(tmp_path / "*.txt"), 257, 0.01, "uint16", tmp_path / "cache", progress=False)


@pytest.mark.parametrize("corpus, vocab, dtype, message", [
    ("nope", 2048, "uint16", r"data.corpus='nope': expected one of python_docs, python_source, or a directory"),
    ("{tmp}/*.txt", 2048, "uint16", r"data.corpus='.*/\*.txt': .*matches 0 path"),
    ("{tmp}", 2048, "uint16", r"data.corpus='.*': .*holds no .txt or .jsonl file"),
    ("{tmp}/notes.md", 2048, "uint16", r"data.corpus='.*notes.md': .*is not .txt or .jsonl"),
    ("python_docs", 70_000, "uint16", r"data.vocab_size=70000: data.token_dtype='uint16' holds token ids < 65536"),
    ("python_docs", 100, "uint32", r"data.vocab_size=100: expected >= 257"),
    ("python_docs", 2048, "int16", r"data.token_dtype='int16': expected one of uint16, uint32"),
])
def test_bad_corpus_settings_are_refused_before_any_work(tmp_path, corpus, vocab, dtype, message):
    (tmp_path / "notes.md").write_text("markdown is not read")
    with pytest.raises(ValueError, match=message):
        check_corpus(corpus.format(tmp=tmp_path), vocab, dtype)
    with pytest.raises(ValueError, match=message):
        prepare_corpus(corpus.format(tmp=tmp_path), vocab, 0.1, dtype, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("line, message", [
    ('{"title": "no text"}', 'expected a JSON object with a string field "text"'),
    ('{"text": 3}', 'expected a JSON object with a string field "text"'),
    ("not json", "not a JSON line"),
])
def test_bad_jsonl_line_is_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=f"data.corpus=.*: {re.escape(str(path))}:3: {message}"):
        prepare_corpus(str(path), 300, 0.1, "uint16", tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # no half-built cache left behind


def test_python_source_is_the_sorted_stdlib_without_installed_packages():
    source = resolve_corpus("python_source")
    names = [name for name, _ in source.files]
    assert names == sorted(names) and len(names) > 500 and "os.py" in names and "asyncio/base_events.py" in names
    assert all(name.endswith(".py") and "site-packages" not in name and "dist-packages" not in name for name in names)
    assert all(path.is_file() for _, path in source.files)
    again = resolve_corpus("python_source")
    assert again.file_list_hash == source.file_list_hash and again.content_hash() == source.content_hash()


def test_open_corpus_refuses_a_missing_or_truncated_cache(tmp_path, user_corpus):
    with pytest.raises(ValueError, match="not a prepared corpus"):
        open_corpus(tmp_path / "nothing")
    directory = prepare_corpus(str(user_corpus[0]), 300, 0.2, "uint16", tmp_path / "cache", progress=False)
    with open(directory / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="train.bin: 10 bytes, meta.json expects"):
        open_corpus(directory)


def batches(tokens, rank, world, seed=0, **kw):
    return TokenBatches(tokens, seq_len=8, micro_batch_size=2, rank=rank, world_size=world, seed=seed, **kw)


def test_batches_are_next_token_windows():
    tokens = torch.arange(1000)
    inputs, targets = batches(tokens, 0, 1).get(3)
    assert inputs.shape == targets.shape == (2, 8)
    assert torch.equal(targets, inputs + 1)  # consecutive tokens, shifted by one


def test_batches_read_a_memmap_like_a_tensor(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(60_000, 61_000, dtype=np.uint16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    for index in (0, 5, 200):  # 200: a later epoch
        inputs, targets = batches(tokens, 1, 2).get(index)
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.min() >= 60_000  # no int16 wrap-around
        expected = batches(torch.arange(60_000, 61_000), 1, 2).get(index)
        assert torch.equal(inputs, expected[0]) and torch.equal(targets, expected[1])


def test_ranks_get_disjoint_windows_and_a_pure_function_of_the_index():
    tokens = torch.arange(1000)
    world = [batches(tokens, r, 3) for r in range(3)]
    seen = []
    for index in range(21):  # 126 samples >= one epoch of 124 windows
        for rank_batches in world:
            seen += rank_batches.get(index)[0][:, 0].tolist()
    per_epoch = world[0].n_windows
    first_epoch = seen[:per_epoch]
    assert len(set(first_epoch)) == per_epoch  # every window once per epoch, across ranks
    fresh = batches(tokens, 1, 3)
    assert torch.equal(fresh.get(17)[0], world[1].get(17)[0])  # no hidden state: resume is exact


def test_epochs_reshuffle_and_seed_changes_order():
    tokens = torch.arange(1000)
    b = batches(tokens, 0, 1)
    per_epoch = b.n_windows // 2
    epoch0 = torch.cat([b.get(i)[0][:, 0] for i in range(per_epoch)])
    epoch1 = torch.cat([b.get(per_epoch + i)[0][:, 0] for i in range(per_epoch)])
    assert not torch.equal(epoch0, epoch1) and torch.equal(epoch0.sort().values, epoch1.sort().values)
    assert not torch.equal(b.get(0)[0], batches(tokens, 0, 1, seed=1).get(0)[0])
    ordered = batches(tokens, 0, 1, shuffle=False)
    assert ordered.get(0)[0][:, 0].tolist() == [0, 8]


def test_too_little_data_is_refused_with_the_key():
    with pytest.raises(ValueError, match="data.seq_len=8"):
        TokenBatches(torch.arange(20), seq_len=8, micro_batch_size=2, rank=0, world_size=2, seed=0)


def test_a_file_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_bytes("café in latin-1".encode("latin-1"))
    (tmp_path / "c.txt").write_text("third document")
    directory = prepare_corpus(str(tmp_path), 300, 0.2, "uint16", tmp_path / "cache", progress=False)
    assert open_corpus(directory).params["data.skipped_files"] == 1
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["skipped"] == ["b.txt"] and meta["files"] == 3 and meta["documents"] == 2


@pytest.mark.slow
def test_python_source_builds_and_is_reused(tmp_path):
    """The whole standard library (~31 MB): ~20 s on 2 CPU cores, most of it tokenizing."""
    directory = prepare_corpus("python_source", 8192, 0.05, "uint16", tmp_path, progress=False)
    corpus = open_corpus(directory)
    p = corpus.params
    assert p["data.python_version"] == ".".join(map(str, sys.version_info[:3])) and p["data.files"] > 500
    assert p["data.train_tokens"] > 1_000_000 and 0.02 < p["data.val_tokens"] / p["data.train_tokens"] < 0.1
    assert corpus.train.max() < 8192 and corpus.val[-1] == corpus.eot_id
    assert prepare_corpus("python_source", 8192, 0.05, "uint16", tmp_path, progress=False) == directory


def test_prefetched_batches_are_the_batches_and_the_next_is_made_ahead_on_another_thread():
    made = []  # (index, thread) of every batch made

    class Recording:
        def get(self, index):
            made.append((index, threading.current_thread().name))
            return torch.full((2,), index)

    batches = Prefetched(Recording())
    for index in [0, 1, 2, 7, 8]:  # in order, then a jump (a resumed run)
        assert torch.equal(batches.get(index), torch.full((2,), index))
    batches.pool.shutdown(wait=True)
    main = threading.current_thread().name
    assert sorted(index for index, _ in made) == [0, 1, 2, 3, 7, 8, 9]  # 3: made ahead, never used
    assert sorted(index for index, thread in made if thread == main) == [0, 7]
