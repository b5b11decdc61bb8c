"""The text corpus, its tokenizer, and deterministic rank-sharded batches.

`TokenBatches.get(micro_batch_index)` is a pure function of its argument (and the seed), so a run
resumed from a checkpoint at step k sees exactly the batches that an uninterrupted run would have.
"""

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CORPUS_PATH = HERE / "python_docs.jsonl.gz"
TOKENIZER_PATH = HERE / "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"
VOCAB_SIZE = 2048
CORPORA = {"python_docs": CORPUS_PATH}


def write_corpus(documents: list[dict], path: Path) -> None:
    # mtime=0 keeps the file byte-identical when rebuilt from the same text.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for doc in documents:
            f.write((json.dumps(doc, ensure_ascii=False) + "\n").encode())


def read_corpus(name: str) -> list[dict]:
    if name not in CORPORA:
        raise ValueError(f"data.corpus={name!r}: expected one of {sorted(CORPORA)}")
    with gzip.open(CORPORA[name], "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE (GPT-2 style): any text encodes, nothing maps to an unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[END_OF_TEXT],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER_PATH))


@dataclass(frozen=True)
class TokenSplits:
    train: torch.Tensor  # int64 [n_train_tokens]
    val: torch.Tensor  # int64 [n_val_tokens]
    vocab_size: int


def tokenize_corpus(name: str, val_fraction: float) -> TokenSplits:
    """Whole documents go to one split, in title order: a document is validation while the validation
    split holds less than `val_fraction` of the tokens seen so far (documents vary 100x in length)."""
    tokenizer = load_tokenizer()
    eot = tokenizer.token_to_id(END_OF_TEXT)
    train, val = [], []
    for doc in read_corpus(name):
        ids = tokenizer.encode(doc["text"]).ids + [eot]
        (val if len(val) < val_fraction * (len(train) + len(val) + len(ids)) else train).extend(ids)
    return TokenSplits(torch.tensor(train), torch.tensor(val), tokenizer.get_vocab_size())


class TokenBatches:
    """Fixed windows of `seq_len + 1` tokens, reshuffled every epoch, sharded by rank.

    Sample i of the run (counted over all ranks and micro-steps) is window
    `permutation(epoch = i // n_windows)[i % n_windows]`; rank r takes its own slice of each global
    micro-batch, so ranks never see the same window in the same step.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, micro_batch_size: int,
                 rank: int, world_size: int, seed: int, shuffle: bool = True):
        n_windows = (len(tokens) - 1) // seq_len
        if n_windows < micro_batch_size * world_size:
            raise ValueError(
                f"data.seq_len={seq_len}: the split has {len(tokens)} tokens, too few for one global "
                f"micro-batch of {micro_batch_size} x {world_size} windows"
            )
        self.tokens, self.seq_len, self.n_windows = tokens, seq_len, n_windows
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self._permutations: dict[int, torch.Tensor] = {}

    @property
    def num_batches(self) -> int:
        """Global micro-batches per epoch."""
        return self.n_windows // (self.micro_batch_size * self.world_size)

    def _window(self, sample: int) -> int:
        epoch, position = divmod(sample, self.n_windows)
        if not self.shuffle:
            return position
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._permutations = {epoch: torch.randperm(self.n_windows, generator=generator)}
        return int(self._permutations[epoch][position])

    def get(self, micro_batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets `[micro_batch_size, seq_len]` of global micro-batch `index`."""
        first = (micro_batch_index * self.world_size + self.rank) * self.micro_batch_size
        starts = [self._window(first + j) * self.seq_len for j in range(self.micro_batch_size)]
        windows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts])
        return windows[:, :-1], windows[:, 1:]
