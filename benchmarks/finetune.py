"""LoRA fine-tuning speed: our GPT + our LoRA vs transformers GPT-2 + peft LoRA, same weights, same A/B.

    .venv/bin/python benchmarks/finetune.py [--layers 4 --embd 256 --vocab 8192 --seq 128 --batch 8 --steps 12]

Both sides train the same model (a random GPT-2 converted with load_hf_gpt2) with rank-8 adapters
on c_attn, c_proj (attention and MLP) and c_fc, AdamW, one thread, timed in alternation (A B A B...)
so machine load hits both alike. Printed: a markdown table of median step time, tokens/s and the
ratio ours/peft (> 1 = we are faster), plus the step-0 loss of both (equal: same math).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from _cli import cli_args  # noqa: E402  (benchmarks/ is the script's folder)


def build(args):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptcore.convert.hf import load_hf_gpt2
    from gptcore.model.lora import apply_lora, lora_modules

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.embd, n_layer=args.layers,
                                    n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_hf_gpt2(d)
    apply_lora(ours, rank=args.rank, alpha=2 * args.rank)
    ref = get_peft_model(hf, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["c_attn", "c_proj", "c_fc"],
                                        fan_in_fan_out=True, lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.01)
            pm = ref.get_submodule(f"base_model.model.{name}")
            pm.lora_A["default"].weight.copy_(m.lora_A)
            pm.lora_B["default"].weight.copy_(m.lora_B)
    return ours.train(), ref.train()


def main() -> None:
    args = cli_args(__doc__, layers=4, heads=4, embd=256, vocab=8192, seq=128, batch=8, rank=8, steps=12, threads=1)
    torch.set_num_threads(args.threads)

    ours, ref = build(args)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    y = torch.roll(x, -1, dims=1)
    y[:, -1] = -100  # the last position has no next token (HF drops it by shifting the labels)
    with torch.no_grad():
        loss_ours = float(ours(x, y)[1])
        loss_ref = float(ref(input_ids=x, labels=x).loss)  # HF shifts the labels inside
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    opt_r = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3)

    def step_ours():
        _, loss = ours(x, y)
        loss.backward()
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)

    def step_ref():
        out = ref(input_ids=x, labels=x)
        out.loss.backward()
        opt_r.step()
        opt_r.zero_grad(set_to_none=True)

    times = {"ours": [], "peft": []}
    for _ in range(2):  # warmup
        step_ours()
        step_ref()
    for _ in range(args.steps):
        for name, fn in (("ours", step_ours), ("peft", step_ref)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

    tokens = args.batch * args.seq
    n_o = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_r = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model: {args.layers} layers, n_embd {args.embd}, vocab {args.vocab}; batch {args.batch} x {args.seq} tokens; "
          f"LoRA rank {args.rank}; {args.threads} thread(s); {args.steps} timed steps each, alternating\n")
    print("| LoRA training step (fwd + bwd + AdamW) | trainable params | median step | tokens/s |")
    print("|---|---:|---:|---:|")
    print(f"| gptcore GPT + gptcore.model.lora | {n_o:,} | {med['ours'] * 1e3:.1f} ms | {tokens / med['ours']:,.0f} |")
    print(f"| transformers GPT2 + peft | {n_r:,} | {med['peft'] * 1e3:.1f} ms | {tokens / med['peft']:,.0f} |")
    print(f"| **ratio ours/peft (tokens/s)** | | | **{med['peft'] / med['ours']:.2f}x** |")
    print(f"\nstep-0 loss (same weights, same A and B): ours {loss_ours:.6f}, peft {loss_ref:.6f}")
    from _cli import summary

    summary("finetune", "LoRA step vs transformers + peft", f"{med['peft'] / med['ours']:.2f}x")


if __name__ == "__main__":
    main()
