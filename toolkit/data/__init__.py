"""Token data: ``prepare`` turns text into uint16 token shards; ``TokenLoader`` serves batches.

Prepared layout (``prepared_dir(data)``, default ``data/<dataset>-<tokenizer>``)::

    train_000000.bin ...   raw little-endian uint16 tokens, np.memmap-readable, shard_size each
    val_000000.bin ...     (the last shard of a split is shorter)
    tokenizer.json         the tokenizer, so a run can decode without the corpus
    meta.json              format, tokenizer, token/shard counts per split, the inputs' fingerprint

One job per module, each importing only those before it:

    shards.py     the prepared folder: shards, meta.json and progress.json, and which files are prepare's own
    sources.py    the input files data.paths means (.txt, .jsonl, .parquet, datasets folders) and their documents
    tokenize.py   documents to token ids in tasks of about 1 MB, in this process or a pool of workers
    pipeline.py   ``prepare``: sources through the tokenizer into shards, resumable, the val split
    loader.py     reading a prepared folder back: meta.json, a split's shards, ``TokenLoader``
"""
from .loader import TokenLoader, read_meta, read_split, tokens_in
from .pipeline import prepare
from .shards import prepared_dir

__all__ = ["TokenLoader", "prepare", "prepared_dir", "read_meta", "read_split", "tokens_in"]
