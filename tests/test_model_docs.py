"""The course page's code runs as printed, and its step-by-step MultiHeadAttention equals ours."""

import re
from pathlib import Path

import torch

from gptcore.model.gpt import CausalSelfAttention, GPTConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "02-attention.md"


def test_attention_page_code_runs_and_matches_our_attention():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    ns: dict = {}
    for code in blocks:  # each block's own asserts check the page's claims (incl. book == ours)
        exec(compile(code, str(DOC), "exec"), ns)

    # and independently here: the book's class vs our CausalSelfAttention at another size, with dropout off
    torch.manual_seed(1)
    C, nh, T = 48, 6, 11
    book = ns["MultiHeadAttention"](d_in=C, d_out=C, context_length=16, dropout=0.0, num_heads=nh, qkv_bias=True)
    for impl in ("math", "sdpa"):
        ours = CausalSelfAttention(GPTConfig(vocab_size=10, block_size=16, n_layer=1, n_head=nh, n_embd=C,
                                             attn_impl=impl))
        with torch.no_grad():
            ours.c_attn.weight.copy_(torch.cat([book.W_query.weight, book.W_key.weight, book.W_value.weight]))
            ours.c_attn.bias.copy_(torch.cat([book.W_query.bias, book.W_key.bias, book.W_value.bias]))
            ours.c_proj.load_state_dict(book.out_proj.state_dict())
            x = torch.randn(3, T, C)
            assert (ours(x) - book(x)).abs().max() < 1e-5, impl
