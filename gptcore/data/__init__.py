"""Project 3, part one — the data: text in, verified token shards out (docs/03-data.md).

    sources.py  where documents come from: the builtin python-stdlib corpus, `hf:` streaming, `files:` globs
    shards.py   the llm.c shard format (a 256-int header, then uint16/uint32 tokens), verified on read
    sharding.py documents -> train/val split by hash -> tokenized shards + manifest.json; `ShardLoader`
                reads (x, y) windows back with a resumable position
    sft.py      fine-tuning records (instruction or classification): builtin sets, JSONL, the prompt template
"""

from gptcore.data.sharding import (MANIFEST_FORMAT, SPLIT_RULE, SPLITS, ShardLoader, bytes_per_token, hash_split,
                                  load_manifest, prepare, prepare_shards, split_of)
from gptcore.data.shards import read_shard, read_shard_header, shard_header, token_dtype, write_shard
from gptcore.data.sources import (cap_bytes, download, files_documents, hf_documents, iter_documents, parse_hf_source,
                                  python_stdlib_documents, read_jsonl_documents)

__all__ = ["MANIFEST_FORMAT", "SPLIT_RULE", "SPLITS", "ShardLoader", "bytes_per_token", "cap_bytes", "download",
           "files_documents", "hash_split", "hf_documents", "iter_documents", "load_manifest", "parse_hf_source", "prepare",
           "prepare_shards", "python_stdlib_documents", "read_jsonl_documents", "read_shard", "read_shard_header",
           "shard_header", "split_of", "token_dtype", "write_shard"]
