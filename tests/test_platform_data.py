"""Corpus, tokenizer and the deterministic, rank-sharded batches."""

import json

import pytest
import torch

from sparta.platform.data import (
    TOKENIZER_PATH,
    TokenBatches,
    load_tokenizer,
    read_corpus,
    tokenize_corpus,
    train_tokenizer,
)


def test_tokenizer_round_trips_any_text():
    tokenizer = load_tokenizer()
    assert tokenizer.get_vocab_size() == 2048
    text = 'def f(x):\n    return x ** 2  # naïve — 数学 ✓\n'
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_shipped_tokenizer_is_reproducible_from_the_shipped_corpus():
    retrained = train_tokenizer([doc["text"] for doc in read_corpus("python_docs")])
    shipped = json.loads(TOKENIZER_PATH.read_text())
    assert json.loads(retrained.to_str())["model"]["vocab"] == shipped["model"]["vocab"]


def test_corpus_is_real_text_split_by_whole_documents():
    docs = read_corpus("python_docs")
    assert len(docs) > 50 and sum(len(d["text"]) for d in docs) > 400_000
    splits = tokenize_corpus("python_docs", val_fraction=0.1)
    assert 0.05 < len(splits.val) / (len(splits.train) + len(splits.val)) < 0.2
    with pytest.raises(ValueError, match="data.corpus='nope'"):
        read_corpus("nope")


def batches(tokens, rank, world, seed=0, **kw):
    return TokenBatches(tokens, seq_len=8, micro_batch_size=2, rank=rank, world_size=world, seed=seed, **kw)


def test_batches_are_next_token_windows():
    tokens = torch.arange(1000)
    inputs, targets = batches(tokens, 0, 1).get(3)
    assert inputs.shape == targets.shape == (2, 8)
    assert torch.equal(targets, inputs + 1)  # consecutive tokens, shifted by one


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
