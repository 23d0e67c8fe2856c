#!/usr/bin/env python3
"""peft + transformers eager baseline for the LoRA-step benchmark.

Loads the checkpoint written by `atoll model init` (same config, same weights), puts PEFT LoRA
adapters (same rank, alpha 2r, all seven projections, no dropout) on it and times forward +
backward + grad clipping + AdamW over the adapters on a random batch. Prints one JSON line like
`atoll bench lora-step`.
"""
import argparse
import json
import statistics
import time

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--rank", type=int, default=16)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--threads", type=int, required=True)
a = p.parse_args()

torch.set_num_threads(a.threads)
torch.manual_seed(0)
base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager")
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = get_peft_model(base, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=targets))
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
vocab = base.config.vocab_size
tokens = torch.randint(0, vocab, (a.batch, a.seq + 1))
x, y = tokens[:, :-1], tokens[:, 1:]
times = []
for i in range(a.warmup + a.steps):
    start = time.perf_counter()
    logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), y.reshape(-1), reduction="sum") / y.numel()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=False)
    loss.item()
    if i >= a.warmup:
        times.append((time.perf_counter() - start) * 1000)
median = statistics.median(times)
print(json.dumps({
    "impl": f"peft {peft.__version__} + transformers {transformers.__version__} eager, torch {torch.__version__}",
    "batch": a.batch, "seq": a.seq, "rank": a.rank, "steps": a.steps, "threads": torch.get_num_threads(),
    "median_ms": median, "tokens_per_s": a.batch * a.seq / (median / 1000),
}))
