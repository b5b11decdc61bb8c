"""Text corpora, their tokenizers, memory-mapped token caches and deterministic rank-sharded batches.

The driver calls `prepare_corpus` once, before Ray starts: it resolves `data.corpus` to files, trains a
byte-level BPE on them (or takes the shipped one) and writes the tokens as flat arrays (nanoGPT style)
into a cache directory named after a hash of the file names, their contents and the settings, so a
later run reuses it and a changed file or setting gets a new one. Workers call `open_corpus`, which
maps those arrays and tokenizes nothing.

`TokenBatches.get(micro_batch_index)` is a pure function of its argument (and the seed), so a run
resumed from a checkpoint at step k sees exactly the batches that an uninterrupted run would have.
"""

import glob
import gzip
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CORPUS_PATH = HERE / "python_docs.jsonl.gz"
TOKENIZER_FILE = "tokenizer.json"  # in a prepared corpus directory (and an export) as beside this file
TOKENIZER_PATH = HERE / TOKENIZER_FILE
END_OF_TEXT = "<|endoftext|>"
VOCAB_SIZE = 2048  # the shipped tokenizer's
CORPORA = ("python_docs", "python_source")
TOKEN_DTYPES = ("uint16", "uint32")
USER_SUFFIXES = (".txt", ".jsonl")
# Part of every cache key: bump it when the cache layout or the tokenization rules change.
CACHE_FORMAT = 1
# meta.json entries logged as `data.<key>`; the config's own data.* keys are logged with the config.
PARAM_KEYS = ("source", "files", "documents", "skipped_files", "bytes", "file_list_hash", "python_version",
              "tokenizer_vocab_size", "eot_id", "train_documents", "val_documents", "train_tokens", "val_tokens",
              "cache_key")


def write_corpus(documents: list[dict], path: Path) -> None:
    # mtime=0 keeps the file byte-identical when rebuilt from the same text.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for doc in documents:
            f.write((json.dumps(doc, ensure_ascii=False) + "\n").encode())


def train_tokenizer(texts, vocab_size: int = VOCAB_SIZE, show_progress: bool = False):
    """Byte-level BPE (GPT-2 style): any text encodes, nothing maps to an unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[END_OF_TEXT],
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_tokenizer(path: Path = TOKENIZER_PATH):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


@dataclass(frozen=True)
class Source:
    """A resolved `data.corpus`: its files in reading order, each named relative to the corpus root.

    Documents: one per `.py`/`.txt` file, one per line of a `.jsonl` file (its field "text"). A `.py` or
    `.txt` file that is not valid UTF-8 is skipped and counted, not decoded with replacement characters:
    in the standard library those are the test fixtures for other encodings (4 files on 3.11).
    """

    corpus: str
    kind: str  # "python_docs", "python_source" or "files"
    files: tuple[tuple[str, Path], ...]  # (relative name, absolute path), sorted by name

    @property
    def file_list_hash(self) -> str:
        return hashlib.sha256("\n".join(name for name, _ in self.files).encode()).hexdigest()

    def content_hash(self) -> str:
        """Hash of the file names and contents: reading 31 MB costs ~0.1 s, a stale cache costs a run."""
        h = hashlib.sha256()
        for name, path in self.files:
            data = path.read_bytes()
            h.update(f"{name}\0{len(data)}\0".encode())
            h.update(data)
        return h.hexdigest()

    def raw_bytes(self) -> int:
        """Bytes that `documents` reads (decompressed for the shipped .gz): the progress bar's total."""
        return sum(len(gzip.decompress(p.read_bytes())) if p.suffix == ".gz" else p.stat().st_size for _, p in self.files)

    def documents(self) -> Iterator[tuple[str, str | None, int]]:
        """(name, text, bytes read) per document in corpus order; text is None for a skipped file."""
        for name, path in self.files:
            if path.suffix not in (".jsonl", ".gz"):
                data = path.read_bytes()
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    text = None
                yield name, text, len(data)
                continue
            with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        yield f"{name}:{number}", self._jsonl_text(path, number, line), len(line)

    def _jsonl_text(self, path: Path, number: int, line: bytes) -> str:
        try:
            record = json.loads(line)
        except ValueError as error:  # bad JSON or bad UTF-8
            raise ValueError(f"data.corpus={self.corpus!r}: {path}:{number}: not a JSON line ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"data.corpus={self.corpus!r}: {path}:{number}: expected a JSON object with a string "
                             f"field \"text\"")
        return record["text"]


def resolve_corpus(corpus: str) -> Source:
    """`python_docs`, `python_source`, or a directory / file / glob of .txt and .jsonl files.

    A known name wins over a file of the same name. A glob is expanded with `**` recursion; `~` and
    relative paths (against the current directory) are allowed everywhere.
    """
    if corpus == "python_docs":
        return Source(corpus, "python_docs", (("python_docs.jsonl.gz", CORPUS_PATH),))
    if corpus == "python_source":
        root = Path(sysconfig.get_paths()["stdlib"])
        return Source(corpus, "python_source", _walk(root, (".py",), skip_dirs=("site-packages", "dist-packages")))
    path = Path(os.path.expanduser(corpus)).absolute()
    if path.is_dir():
        files = _walk(path, USER_SUFFIXES)
        problem = f"directory {path} holds no .txt or .jsonl file"
    elif path.is_file():
        files = ((path.name, path),) if path.suffix in USER_SUFFIXES else ()
        problem = f"file {path} is not .txt or .jsonl"
    else:
        matches = [Path(p) for p in glob.glob(str(path), recursive=True)]
        paths = sorted(p for p in matches if p.is_file() and p.suffix in USER_SUFFIXES)
        root = Path(os.path.commonpath([p.parent for p in paths])) if paths else path
        files = tuple((p.relative_to(root).as_posix(), p) for p in paths)
        problem = f"{path} matches {len(matches)} path(s), no .txt or .jsonl file"
    if not files:
        raise ValueError(f"data.corpus={corpus!r}: expected one of {', '.join(CORPORA)}, or a directory, file or glob "
                         f"of .txt/.jsonl files; {problem}")
    return Source(corpus, "files", files)


def _walk(root: Path, suffixes: tuple[str, ...], skip_dirs: tuple[str, ...] = ()) -> tuple[tuple[str, Path], ...]:
    """Files under `root` with one of `suffixes`, sorted by relative path (symlinked dirs not followed)."""
    files = []
    for directory, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip_dirs]
        files += [Path(directory, n) for n in names if Path(n).suffix in suffixes]
    return tuple(sorted((p.relative_to(root).as_posix(), p) for p in files))


def check_corpus(corpus: str, vocab_size: int, token_dtype: str) -> None:
    """Cheap validation with no tokenization (config checks call it before anything starts)."""
    _check_vocab(vocab_size, token_dtype)
    resolve_corpus(corpus)


def _check_vocab(vocab_size: int, token_dtype: str) -> None:
    if token_dtype not in TOKEN_DTYPES:
        raise ValueError(f"data.token_dtype={token_dtype!r}: expected one of {', '.join(TOKEN_DTYPES)}")
    if vocab_size < 257:
        raise ValueError(f"data.vocab_size={vocab_size!r}: expected >= 257 (256 byte tokens + the end-of-text token)")
    limit = int(np.iinfo(token_dtype).max) + 1
    if vocab_size > limit:
        raise ValueError(f"data.vocab_size={vocab_size!r}: data.token_dtype={token_dtype!r} holds token ids < {limit}; "
                         f"use data.token_dtype='uint32' or a smaller vocabulary")


def prepare_corpus(corpus: str, vocab_size: int, val_fraction: float, token_dtype: str, cache_root: Path,
                   progress: bool = True) -> Path:
    """Driver side, before Ray starts: resolve the corpus, check it, build (or reuse) the cache dir
    under cache_root; returns the cache dir path (absolute).

    The cache is built in a temporary directory beside its final name and renamed into place once
    complete, so a crash leaves nothing that is trusted later, and of two concurrent preparers the
    second finds the first's directory and throws its own away.
    """
    _check_vocab(vocab_size, token_dtype)
    if not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction={val_fraction!r}: expected in (0, 1)")
    source = resolve_corpus(corpus)
    shipped_tokenizer = source.kind == "python_docs" and vocab_size == VOCAB_SIZE
    settings = {"format": CACHE_FORMAT, "source": source.kind, "vocab_size": vocab_size, "val_fraction": val_fraction,
                "token_dtype": token_dtype, "files": source.content_hash(),
                "tokenizer": hashlib.sha256(TOKENIZER_PATH.read_bytes()).hexdigest() if shipped_tokenizer else "trained"}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    cache_root = Path(cache_root).expanduser().absolute()
    directory = cache_root / f"{source.kind}-{key[:16]}"
    if not directory.exists():
        cache_root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=cache_root))
        try:
            _build(source, vocab_size, val_fraction, token_dtype, shipped_tokenizer, key, building, progress)
            try:
                os.rename(building, directory)
            except OSError:
                if not directory.exists():  # not lost to a concurrent preparer: a real error
                    raise
        finally:
            shutil.rmtree(building, ignore_errors=True)
    open_corpus(directory)  # refuse a directory that is not a complete cache
    return directory


def _build(source: Source, vocab_size: int, val_fraction: float, token_dtype: str, shipped_tokenizer: bool,
           key: str, out: Path, progress: bool) -> None:
    """Tokenize `source` into out/{train,val}.bin, out/tokenizer.json and out/meta.json (written last)."""
    from tqdm import tqdm

    if shipped_tokenizer:
        shutil.copyfile(TOKENIZER_PATH, out / TOKENIZER_FILE)
    else:
        if progress:
            print(f"data.corpus={source.corpus!r}: training a {vocab_size}-token BPE tokenizer", file=sys.stderr)
        texts = (text for _, text, _ in source.documents() if text is not None)
        train_tokenizer(texts, vocab_size, show_progress=progress).save(str(out / TOKENIZER_FILE))
    tokenizer = load_tokenizer(out / TOKENIZER_FILE)
    tokenizer.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text, not a boundary
    eot = tokenizer.token_to_id(END_OF_TEXT)
    dtype = np.dtype(token_dtype)
    splits = {"train": _SplitWriter(out / "train.bin", dtype), "val": _SplitWriter(out / "val.bin", dtype)}
    skipped, text_bytes, pending = [], 0, None
    bar = tqdm(total=source.raw_bytes(), unit="B", unit_scale=True, desc=f"tokenizing {source.corpus}",
               disable=not progress, file=sys.stderr)
    with bar:
        for batch in _batches(source.documents()):
            encodings = iter(tokenizer.encode_batch([text for _, text, _ in batch if text is not None]))
            for name, text, size in batch:
                bar.update(size)
                if text is None:
                    skipped.append(name)
                    continue
                text_bytes += len(text.encode("utf-8"))
                # One document is held back so that the last can go to whichever split is still empty.
                if pending:
                    splits["val" if _is_val(pending[0], val_fraction) else "train"].write(pending[1])
                pending = (name, np.array(next(encodings).ids + [eot], dtype=dtype))
    documents = splits["train"].documents + splits["val"].documents + (pending is not None)
    if documents < 2:
        raise ValueError(f"data.corpus={source.corpus!r}: {documents} document(s); a train/val split by whole "
                         f"documents needs at least 2")
    empty = [split for split, writer in splits.items() if writer.documents == 0]
    splits[empty[0] if empty else "val" if _is_val(pending[0], val_fraction) else "train"].write(pending[1])
    for writer in splits.values():
        writer.close()
    meta = {
        "corpus": source.corpus, "source": source.kind, "files": len(source.files), "documents": documents,
        "skipped_files": len(skipped), "skipped": skipped, "bytes": text_bytes, "file_list_hash": source.file_list_hash,
        **({"python_version": ".".join(map(str, sys.version_info[:3]))} if source.kind == "python_source" else {}),
        "vocab_size": vocab_size, "tokenizer_vocab_size": tokenizer.get_vocab_size(), "eot_id": eot,
        "token_dtype": token_dtype, "val_fraction": val_fraction,
        "train_documents": splits["train"].documents, "val_documents": splits["val"].documents,
        "train_tokens": splits["train"].tokens, "val_tokens": splits["val"].tokens, "cache_key": key,
    }
    with open(out / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _batches(documents: Iterator, max_chars: int = 8 << 20) -> Iterator[list]:
    """Groups of documents of about 8 MB: `encode_batch` spreads a group over the cores, and on the
    standard library 8 MB groups tokenize ~1.6x faster than 1 MB ones (big files balance better)."""
    batch, chars = [], 0
    for document in documents:
        batch.append(document)
        chars += len(document[1] or "")
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _is_val(name: str, val_fraction: float) -> bool:
    """A stable hash of the document's name decides, so the split is spread over the whole corpus."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") < val_fraction * 2**64


class _SplitWriter:
    def __init__(self, path: Path, dtype: np.dtype):
        self.file, self.dtype, self.documents, self.tokens = open(path, "wb"), dtype, 0, 0

    def write(self, ids: np.ndarray) -> None:
        self.file.write(ids.tobytes())
        self.documents, self.tokens = self.documents + 1, self.tokens + len(ids)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # 1-D read-only memmap of token ids
    val: np.ndarray
    vocab_size: int  # the configured size: every id is below it (a tiny corpus may train fewer tokens)
    eot_id: int
    params: dict  # data.* entries for the tracker
    directory: Path


def open_corpus(directory: Path) -> Corpus:
    """Worker side: map a cache dir that `prepare_corpus` built; no tokenization."""
    directory = Path(directory).absolute()
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{directory}: not a prepared corpus (meta.json: {error}); run prepare_corpus first") from None
    dtype = np.dtype(meta["token_dtype"])
    arrays = {}
    for split in ("train", "val"):
        path, expected = directory / f"{split}.bin", meta[f"{split}_tokens"] * dtype.itemsize
        size = path.stat().st_size if path.exists() else None
        if size != expected:
            raise ValueError(f"{path}: {size} bytes, meta.json expects {expected}; delete {directory} to rebuild it")
        arrays[split] = np.memmap(path, dtype=dtype, mode="r")
    params = {f"data.{k}": meta[k] for k in PARAM_KEYS if k in meta} | {"data.cache_dir": str(directory)}
    return Corpus(arrays["train"], arrays["val"], meta["vocab_size"], meta["eot_id"], params, directory)


def count_windows(n_tokens: int, seq_len: int, micro_batch_size: int, world_size: int, split: str = "the") -> int:
    """Windows of `seq_len + 1` tokens in a split; an error naming the keys if one global micro-batch
    does not fit (the driver checks both splits before any worker starts)."""
    n_windows = (n_tokens - 1) // seq_len
    if n_windows < micro_batch_size * world_size:
        raise ValueError(
            f"data.seq_len={seq_len}: {split} split has {n_tokens} tokens, too few for one global micro-batch of "
            f"{micro_batch_size} x {world_size} windows (deepspeed.micro_batch_size x workers); expected a shorter "
            "data.seq_len, a smaller deepspeed.micro_batch_size, or a larger corpus or data.val_fraction")
    return n_windows


class TokenBatches:
    """Fixed windows of `seq_len + 1` tokens, reshuffled every epoch, sharded by rank.

    Sample i of the run (counted over all ranks and micro-steps) is window
    `permutation(epoch = i // n_windows)[i % n_windows]`; rank r takes its own slice of each global
    micro-batch, so ranks never see the same window in the same step. `tokens` is a 1-D torch tensor
    or numpy array (a memmap: only the windows read are copied out of it).
    """

    def __init__(self, tokens: torch.Tensor | np.ndarray, seq_len: int, micro_batch_size: int,
                 rank: int, world_size: int, seed: int, shuffle: bool = True):
        n_windows = count_windows(len(tokens), seq_len, micro_batch_size, world_size)
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
        """Inputs and next-token targets `[micro_batch_size, seq_len]` (int64) of global micro-batch `index`."""
        first = (micro_batch_index * self.world_size + self.rank) * self.micro_batch_size
        starts = [self._window(first + j) * self.seq_len for j in range(self.micro_batch_size)]
        windows = [self.tokens[s : s + self.seq_len + 1] for s in starts]
        if isinstance(self.tokens, torch.Tensor):
            batch = torch.stack(windows).long()
        else:
            batch = torch.from_numpy(np.stack(windows).astype(np.int64))
        return batch[:, :-1], batch[:, 1:]


class Prefetched:
    """Batches (`get(index)`, a pure function of the index, a tuple of tensors) whose next micro-batch is
    made on a background thread while the model trains on this one: the procedural video source spends
    ~20 ms of CPU a clip, which would otherwise stall the GPU every step.

    pin_memory: the batches come in page-locked memory, so that `.to(device, non_blocking=True)` copies
    them without making the host wait for the GPU (a copy from pageable memory does)."""

    def __init__(self, batches, pin_memory: bool = False):
        self.batches, self.pin_memory = batches, pin_memory
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.ahead: tuple[int, Future] | None = None

    def get(self, index: int):
        if self.ahead is not None and self.ahead[0] == index:
            batch = self.ahead[1].result()
        else:  # the first call, or a jump (a resumed run): made here
            batch = self._make(index)
        self.ahead = (index + 1, self.pool.submit(self._make, index + 1))
        return batch

    def _make(self, index: int):
        batch = self.batches.get(index)
        return tuple(tensor.pin_memory() for tensor in batch) if self.pin_memory else batch
