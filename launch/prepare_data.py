"""Rebuild the corpus and tokenizer that ship with sparta (run once by a maintainer, not by users).

The corpus is the Python reference documentation that CPython ships as `pydoc_data.topics`
(PSF licence): ~460 KB of English technical prose. It is frozen into the repo so that every Python
version trains on the same text. The tokenizer is a byte-level BPE trained on it with `tokenizers`.

    python launch/prepare_data.py      # rewrites platform/python_docs.jsonl.gz and platform/tokenizer.json
"""

from sparta.platform.data import CORPUS_PATH, TOKENIZER_PATH, train_tokenizer, write_corpus


def main() -> None:
    import pydoc_data.topics

    documents = [{"title": title, "text": pydoc_data.topics.topics[title]}
                 for title in sorted(pydoc_data.topics.topics)]
    write_corpus(documents, CORPUS_PATH)
    tokenizer = train_tokenizer([d["text"] for d in documents])
    tokenizer.save(str(TOKENIZER_PATH))
    print(f"{CORPUS_PATH}: {len(documents)} documents; {TOKENIZER_PATH}: vocab {tokenizer.get_vocab_size()}")


if __name__ == "__main__":
    main()
