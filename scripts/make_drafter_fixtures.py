#!/usr/bin/env python3
"""Creates a tiny random Gemma 4 MTP drafter (transformers' `Gemma4UnifiedAssistantForCausalLM`)
paired with the `gemma4-tiny` target fixture, and records what transformers computes with it.

Output: tests/fixtures/gemma4-assistant-tiny/{config.json, model.safetensors, reference.safetensors}.
reference.safetensors holds, for each context length c in CONTEXTS:
  `input_ids` [T] (int64, the target's input),
  `c{c}.logits` [STEPS, vocab] (f32), `c{c}.projected` [STEPS, backbone] (f32) and `c{c}.tokens` [STEPS]
  (int64): the drafter's greedy chain from the target's K/V of positions 0..c-1, its last hidden state
  h_{c-1} and the token x_c at position id c, exactly as
  `SinglePositionMultiTokenCandidateGenerator.get_candidates` feeds it.
Run through `make fixtures` (after scripts/make_fixtures.py, whose gemma4-tiny is the target).
"""
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

from transformers import Gemma4UnifiedForCausalLM
from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedTextConfig
from transformers.models.gemma4_unified_assistant import (
    Gemma4UnifiedAssistantConfig,
    Gemma4UnifiedAssistantForCausalLM,
)

import gemma4_assistant_compat

gemma4_assistant_compat.patch()

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
TARGET = "gemma4-tiny"
NAME = "gemma4-assistant-tiny"
# 4: the sliding mask covers everything; 12 and 20: longer than the window (8) + 1, so it cuts.
CONTEXTS = [4, 12, 20]
STEPS = 3


def shared_kv_target(path):
    """The target with its last sliding and last full layer storing K/V in `shared_kv_states`, as
    transformers does for targets that have KV-shared layers (`kv_sharing_modes` "store")."""
    target = Gemma4UnifiedForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    target.eval()
    types = target.config.layer_types
    for kind in set(types):
        last = max(i for i, t in enumerate(types) if t == kind)
        target.model.layers[last].self_attn.store_full_length_kv = True
    return target


def assistant_config(target_config):
    text = Gemma4UnifiedTextConfig(
        vocab_size=target_config.vocab_size,
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        # K/V come from the target: its KV-head counts and head dims (gemma4-tiny: 2 x 16 sliding,
        # 1 x 32 full).
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=512,
    )
    return Gemma4UnifiedAssistantConfig(text_config=text.to_dict(), backbone_hidden_size=target_config.hidden_size)



def randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + 1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.rand(b.shape, generator=gen) * 0.5 + 0.75)


def draft_chain(target, assistant, input_ids, context, steps):
    """The drafter's greedy chain at context length `context`, as the candidate generator runs it."""
    with torch.no_grad():
        out = target(
            input_ids=input_ids[:, :context],
            output_hidden_states=True,
            return_shared_kv_states=True,
            use_cache=False,
        )
        shared = {k: (v[0], v[1]) for k, v in out.shared_kv_states.items()}
        assert set(shared) == {"full_attention", "sliding_attention"}, shared.keys()
        last_hidden = out.hidden_states[-1][:, -1:]
        token = input_ids[:, context : context + 1]
        position_ids = torch.tensor([[context]], dtype=torch.long)
        embed = target.get_input_embeddings()
        logits, projected, tokens = [], [], []
        for _ in range(steps):
            inputs_embeds = torch.cat([embed(token), last_hidden], dim=-1)
            o = assistant(inputs_embeds=inputs_embeds, position_ids=position_ids, shared_kv_states=shared, use_cache=False)
            token = o.logits.argmax(dim=-1)
            last_hidden = o.last_hidden_state
            logits.append(o.logits[0, 0])
            projected.append(o.last_hidden_state[0, 0])
            tokens.append(token[0, 0])
    return torch.stack(logits).float(), torch.stack(projected).float(), torch.stack(tokens)


def main():
    torch.manual_seed(0)
    target_dir = os.path.join(OUT, TARGET)
    target = shared_kv_target(target_dir)
    out_dir = os.path.join(OUT, NAME)
    shutil.rmtree(out_dir, ignore_errors=True)
    model = Gemma4UnifiedAssistantForCausalLM(assistant_config(target.config))
    randomize(model, 7)
    model.save_pretrained(out_dir)

    # Reload as a user would, in eager f32.
    assistant = Gemma4UnifiedAssistantForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager")
    assistant.eval()
    gen = torch.Generator().manual_seed(107)
    input_ids = torch.randint(0, target.config.vocab_size, (1, max(CONTEXTS) + 1), generator=gen)
    record = {"input_ids": input_ids[0].clone()}
    for c in CONTEXTS:
        logits, projected, tokens = draft_chain(target, assistant, input_ids, c, STEPS)
        record[f"c{c}.logits"] = logits.contiguous()
        record[f"c{c}.projected"] = projected.contiguous()
        record[f"c{c}.tokens"] = tokens.contiguous()
        print(f"{NAME}: context {c}: drafted {tokens.tolist()}, |logits| max {logits.abs().max():.3f}")
    save_file(record, os.path.join(out_dir, "reference.safetensors"))


if __name__ == "__main__":
    main()
