#!/usr/bin/env python3
"""LoRA fixtures made with PEFT on the tiny transformers checkpoints of tests/fixtures.

Output under tests/fixtures/lora/:
  <name>/adapter_config.json, adapter_model.safetensors   saved by PeftModel.save_pretrained
  <name>/reference.safetensors   `input_ids` [T] and float32 eager `logits` [T, vocab] of base+adapter
  tokenizer.json   a 256-token BPE (Gemma's special ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3, then
                   <start_of_turn>, <end_of_turn>) trained on data/tinyshakespeare.txt, so the tiny
                   checkpoints can be fine-tuned on real text.
PEFT initialises lora_B to zero; here A and B are drawn from a seeded generator before saving, so
the adapter changes the logits. Run through `make lora-fixtures` (reference venv); outputs are small
and committed.
"""
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIXTURES, "lora")

CASES = [
    # name, base fixture, LoraConfig kwargs, seed
    ("gemma3-tiny-r4", "gemma3-tiny",
     dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), 11),
    # Gemma 4 with rsLoRA, K = V full layers (no v_proj there) and a subset of targets.
    ("gemma4-tiny-rslora", "gemma4-tiny",
     dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]), 12),
]


def make_adapter(name, base_name, kwargs, seed):
    base_dir = os.path.join(FIXTURES, base_name)
    out_dir = os.path.join(OUT, name)
    os.makedirs(out_dir, exist_ok=True)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_A" in pname or "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    # A path relative to the repository root, not this machine's.
    model.peft_config["default"].base_model_name_or_path = f"tests/fixtures/{base_name}"
    model.save_pretrained(out_dir)
    os.remove(os.path.join(out_dir, "README.md"))  # PEFT's model-card template
    # Reload as a user would and record the logits.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, out_dir).eval()
    ids = load_file(os.path.join(base_dir, "reference.safetensors"))["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids.unsqueeze(0)).logits[0].float().contiguous()
    save_file({"input_ids": ids.clone(), "logits": logits}, os.path.join(out_dir, "reference.safetensors"))
    print(f"{name}: logits {tuple(logits.shape)}, |max| {logits.abs().max():.3f}")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=256,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        limit_alphabet=100,
    )
    tok.train([os.path.join(ROOT, "data", "tinyshakespeare.txt")], trainer)
    assert tok.get_vocab_size() <= 256, tok.get_vocab_size()
    tok.save(os.path.join(OUT, "tokenizer.json"))
    print(f"tokenizer.json: {tok.get_vocab_size()} tokens")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    for case in CASES:
        make_adapter(*case)
    make_tokenizer()
