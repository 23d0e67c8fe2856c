#!/usr/bin/env python3
"""Checks an `atoll drafter export` directory with transformers: it must load as
`Gemma4UnifiedAssistantForCausalLM` with no missing or unexpected tensors, and its greedy draft
chain from the base checkpoint must equal Atoll's (`atoll drafter draft` output): logits and
projected states within 1e-4, the same tokens.

usage: check_drafter_export.py BASE_DIR EXPORT_DIR PROBE.safetensors IDS(comma-separated)
"""
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import gemma4_assistant_compat  # noqa: E402

gemma4_assistant_compat.patch()

from transformers import AutoConfig, Gemma4UnifiedForCausalLM  # noqa: E402
from transformers.models.gemma4_unified_assistant import Gemma4UnifiedAssistantForCausalLM  # noqa: E402

TOLERANCE = 1e-4


def main():
    base_dir, export_dir, probe_path, ids = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    ids = torch.tensor([[int(i) for i in ids.split(",")]])
    config = AutoConfig.from_pretrained(export_dir)
    assert type(config).__name__ == "Gemma4UnifiedAssistantConfig", type(config).__name__
    assistant, info = Gemma4UnifiedAssistantForCausalLM.from_pretrained(
        export_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"} or None
    assert not bad and not info.get("error_msgs"), f"loading info: {info}"
    assistant.eval()
    target = Gemma4UnifiedForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    target.eval()
    # transformers stores the target's K/V for the drafter from its last layer of each type.
    types = target.config.layer_types
    for kind in set(types):
        target.model.layers[max(i for i, t in enumerate(types) if t == kind)].self_attn.store_full_length_kv = True

    probe = load_file(probe_path)
    steps = probe["tokens"].shape[0]
    context = ids.shape[1] - 1
    with torch.no_grad():
        out = target(input_ids=ids[:, :context], output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
        shared = dict(out.shared_kv_states)
        hidden = out.hidden_states[-1][:, -1:]
        token = ids[:, context:]
        position_ids = torch.tensor([[context]])
        logits, projected, tokens = [], [], []
        for _ in range(steps):
            embeds = torch.cat([target.get_input_embeddings()(token), hidden], dim=-1)
            o = assistant(inputs_embeds=embeds, position_ids=position_ids, shared_kv_states=shared, use_cache=False)
            token = o.logits.argmax(dim=-1)
            hidden = o.last_hidden_state
            logits.append(o.logits[0, 0])
            projected.append(o.last_hidden_state[0, 0])
            tokens.append(token[0, 0])
    logit_err = (torch.stack(logits) - probe["logits"]).abs().max().item()
    projected_err = (torch.stack(projected) - probe["projected"]).abs().max().item()
    same_tokens = torch.stack(tokens).tolist() == probe["tokens"].tolist()
    print(f"max |dlogit| {logit_err:.3e}, max |dprojected| {projected_err:.3e}, tokens equal: {same_tokens}")
    assert logit_err <= TOLERANCE and projected_err <= TOLERANCE, "drafter outputs differ from transformers"
    assert same_tokens, f"drafted {torch.stack(tokens).tolist()} vs atoll {probe['tokens'].tolist()}"

    # As transformers' assistant model: assisted greedy generation equals plain greedy generation.
    assert assistant.generation_config.num_assistant_tokens, "generation_config.json sets num_assistant_tokens"
    with torch.no_grad():
        assisted = target.generate(ids, assistant_model=assistant, max_new_tokens=12, do_sample=False)
        plain = target.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(assisted, plain), f"assisted {assisted.tolist()} vs plain {plain.tolist()}"
    print("OK")


if __name__ == "__main__":
    main()
