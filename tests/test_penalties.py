"""Repetition penalty and no-repeat n-grams against transformers' own logits processors and generate."""

import pytest
import torch

from gptcore.convert.hf import load_hf_gpt2
from gptcore.errors import ConfigError
from gptcore.model.generate import check_sampling
from gptcore.model.gpt import penalize
from test_convert import random_hf  # noqa: E402  (tests/ is on sys.path under pytest)
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor  # noqa: E402  (the reference: dev extra)


def _case(seed: int, B: int = 3, T: int = 30, V: int = 13):
    """Logits of both signs and sequences over a small vocabulary, so tokens and n-grams repeat."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * 3, torch.randint(0, V, (B, T), generator=g)


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    for seed in range(5):
        logits, seq = _case(seed)
        want = RepetitionPenaltyLogitsProcessor(penalty)(seq, logits.clone())
        assert torch.equal(penalize(logits, seq, repetition_penalty=penalty), want)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_equals_transformers(n):
    banned = 0
    for seed in range(5):
        for T in (n - 2, n - 1, 5, 30):  # too short to ban anything, just long enough, long
            if T < 1:
                continue
            logits, seq = _case(seed, T=T, V=5)
            want = NoRepeatNGramLogitsProcessor(n)(seq, logits.clone())
            got = penalize(logits, seq, no_repeat_ngram_size=n)
            assert torch.equal(got, want), (n, T)
            banned += int(torch.isinf(got).sum())
    assert banned > 0  # 30 tokens over a 5-token vocabulary repeat every n-gram size tried


def test_both_in_transformers_order_and_off_is_exact():
    logits, seq = _case(7)
    want = NoRepeatNGramLogitsProcessor(2)(seq, RepetitionPenaltyLogitsProcessor(1.5)(seq, logits.clone()))
    assert torch.equal(penalize(logits, seq, 1.5, 2), want)
    assert penalize(logits, seq) is logits  # off: the very tensor, untouched


@pytest.mark.parametrize("penalty,n", [(3.0, 0), (1.0, 2), (1.2, 3)])
def test_greedy_generation_with_penalties_matches_transformers_generate(tmp_path, penalty, n):
    hf, folder = random_hf(tmp_path)
    ours = load_hf_gpt2(folder)
    idx = torch.randint(0, 311, (2, 6), generator=torch.Generator().manual_seed(1))
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=30, do_sample=False, pad_token_id=0,
                      repetition_penalty=penalty, no_repeat_ngram_size=n)
    got = ours.generate(idx, 30, temperature=0, repetition_penalty=penalty, no_repeat_ngram_size=n)
    assert torch.equal(got, ref)
    plain = ours.generate(idx, 30, temperature=0)
    assert not torch.equal(plain, got)  # the settings changed what greedy picks


def test_invalid_penalties_are_clear_errors():
    for bad in ({"repetition_penalty": 0.0}, {"repetition_penalty": -1.0}, {"no_repeat_ngram_size": -1}):
        with pytest.raises(ConfigError):
            check_sampling(10, 0.8, 50, None, **bad)
