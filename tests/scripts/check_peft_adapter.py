#!/usr/bin/env python3
"""Loads an adapter Atoll wrote with PEFT onto the transformers model and compares logits.

Usage: check_peft_adapter.py BASE_DIR ADAPTER_DIR ATOLL_LOGITS.safetensors [MERGED_LOGITS.safetensors]
ATOLL_LOGITS holds `logits` [T, vocab] from `atoll logits --adapter` for `input_ids` [T] (stored in
the same file); MERGED_LOGITS, the logits of the checkpoint `atoll finetune --merge` wrote. Exits
non-zero when a largest difference from PEFT's float32 eager logits exceeds 1e-4.
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

base_dir, adapter_dir, atoll_file = sys.argv[1:4]
merged_file = sys.argv[4] if len(sys.argv) > 4 else None
tolerance = 1e-4
atoll = load_file(atoll_file)
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
model = PeftModel.from_pretrained(base, adapter_dir).eval()
ids = atoll["input_ids"].long().unsqueeze(0)
with torch.no_grad():
    logits = model(input_ids=ids).logits[0].float()
    with model.disable_adapter():
        base_logits = model(input_ids=ids).logits[0].float()
diff = (logits - atoll["logits"]).abs().max().item()
effect = (logits - base_logits).abs().max().item()
print(f"max |peft - atoll| = {diff:.3e}; adapter effect {effect:.3e}")
if effect < 1e-3:
    sys.exit("the adapter does not change the logits: nothing was trained")
if diff > tolerance:
    sys.exit(f"logits differ by {diff} > {tolerance}")
if merged_file:
    merged = (logits - load_file(merged_file)["logits"]).abs().max().item()
    print(f"max |peft - atoll merged| = {merged:.3e}")
    if merged > tolerance:
        sys.exit(f"merged checkpoint logits differ by {merged} > {tolerance}")
