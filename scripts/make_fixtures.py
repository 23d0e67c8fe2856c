#!/usr/bin/env python3
"""Creates tiny random Gemma 3 / Gemma 4 checkpoints with transformers and records their logits.

Output: tests/fixtures/<name>/{config.json, model.safetensors | shards + index, reference.safetensors}
where reference.safetensors holds `input_ids` [T] (int64) and `logits` [T, vocab] (f32) computed by
transformers in float32 eager attention. Run through `make fixtures` (pinned versions in
scripts/requirements-reference.txt); the outputs are small and committed.
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

import transformers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Gemma4UnifiedForCausalLM,
    Gemma4UnifiedForConditionalGeneration,
    Gemma4UnifiedConfig,
)
from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedTextConfig

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
SEQ_LEN = 21  # longer than every fixture's sliding window (8)
VOCAB = 256


def randomize(model, seed):
    """Random weights with a spread wide enough that norms, scalars and softcaps all matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                # norm weights: Gemma 3 stores w of (1+w), Gemma 4 stores w; keep both away from 0 and 1
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (0.0 if "gemma3" in model.config.model_type else 1.0))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.rand(b.shape, generator=gen) * 0.5 + 0.75)


def ids(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, SEQ_LEN), generator=gen)


def record(model, out_dir, input_ids, dtype=None):
    """Reload what was saved (as a user would) and record float32 eager logits."""
    cls = type(model)
    ref = cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager")
    ref.eval()
    with torch.no_grad():
        logits = ref(input_ids=input_ids).logits[0].float().contiguous()
    save_file({"input_ids": input_ids[0].clone(), "logits": logits}, os.path.join(out_dir, "reference.safetensors"))
    print(f"{os.path.basename(out_dir)}: logits {tuple(logits.shape)}, |max| {logits.abs().max():.3f}")


def save(model, name, seed, dtype=torch.float32, **kwargs):
    out_dir = os.path.join(OUT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    model.to(dtype).save_pretrained(out_dir, **kwargs)
    record(model, out_dir, ids(seed))
    return out_dir


def gemma3_config(**overrides):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        head_dim=24,  # q width 96 != hidden 64, as in the 12B
        query_pre_attn_scalar=20,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    cfg.update(overrides)
    return Gemma3TextConfig(**cfg)


def gemma4_text_config(**overrides):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
        max_position_embeddings=512,
    )
    cfg.update(overrides)
    return Gemma4UnifiedTextConfig(**cfg)


def legacy_gemma3_config(out_dir):
    """Rewrites a Gemma 3 config.json in the pre-v5 spelling (rope_theta, rope_local_base_freq,
    rope_scaling, sliding_window_pattern) so the parser's legacy path is covered by the same weights."""
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = json.load(f)
    rp = cfg.pop("rope_parameters")
    cfg.pop("layer_types")
    cfg.pop("_sliding_window_pattern", None)
    cfg["rope_theta"] = rp["full_attention"]["rope_theta"]
    cfg["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": rp["full_attention"]["factor"]}
    cfg["sliding_window_pattern"] = 3
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def main():
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)

    # Gemma 3: GQA, sliding+full with per-type RoPE (linear x8 on full), query_pre_attn_scalar.
    m = Gemma3ForCausalLM(gemma3_config()); randomize(m, 1)
    save(m, "gemma3-tiny", seed=101)

    # Same weights and ids, legacy config spelling (layers 2 and 5 full = sliding_window_pattern 3).
    out = save(m, "gemma3-tiny-legacy-config", seed=101)
    legacy_gemma3_config(out)
    # transformers must read the legacy spelling to the same model: re-record from the rewritten config.
    record(m, out, ids(101))

    # Softcaps on. transformers' Gemma 3 ignores attn_logit_softcapping (a Gemma 2 field), so this
    # fixture also pins that Atoll ignores it the same way; the final softcap is applied.
    m = Gemma3ForCausalLM(gemma3_config(attn_logit_softcapping=5.0, final_logit_softcapping=3.0)); randomize(m, 2)
    save(m, "gemma3-tiny-softcap", seed=102)

    # bf16 checkpoint; reference logits come from the same bf16 weights computed in float32.
    m = Gemma3ForCausalLM(gemma3_config()); randomize(m, 3)
    save(m, "gemma3-tiny-bf16", seed=103, dtype=torch.bfloat16)

    # Gemma 4 (gemma4_unified text stack): K=V full layers with global_head_dim and 1 KV head,
    # proportional RoPE, layer_scalar, final softcap.
    m = Gemma4UnifiedForCausalLM(gemma4_text_config()); randomize(m, 4)
    save(m, "gemma4-tiny", seed=104)

    # Gemma 4 without K=V (full layers keep v_proj and the regular KV-head count).
    m = Gemma4UnifiedForCausalLM(gemma4_text_config(attention_k_eq_v=False)); randomize(m, 5)
    save(m, "gemma4-tiny-no-keqv", seed=105)

    # Gemma 4 unified multimodal wrapper: `model.language_model.` prefix, nested text_config,
    # vision/audio tensors present (ignored by the text stack), bf16, sharded with an index.
    cfg = Gemma4UnifiedConfig(
        text_config=gemma4_text_config().to_dict(),
        vision_config={"mm_embed_dim": 64, "mm_posemb_size": 16, "output_proj_dims": 64},
        audio_config={"audio_embed_dim": 32},
    )
    m = Gemma4UnifiedForConditionalGeneration(cfg); randomize(m, 6)
    save(m, "gemma4-unified-tiny-sharded-bf16", seed=106, dtype=torch.bfloat16, max_shard_size="100KB")

    gemma3_multimodal()

    real_counts()
    with open(os.path.join(OUT, "VERSIONS"), "w") as f:
        f.write(f"torch=={torch.__version__}\ntransformers=={transformers.__version__}\n")



def gemma3_multimodal_config():
    """Gemma3ForConditionalGeneration: a tiny SigLIP tower and projector around a text stack whose
    query_pre_attn_scalar equals head_dim (as in the 12B), so llama.cpp's fixed attention scale
    and transformers agree on its GGUF export."""
    from transformers import Gemma3Config

    text = gemma3_config(
        vocab_size=300, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        query_pre_attn_scalar=32, intermediate_size=128,
    ).to_dict()
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        patch_size=14, image_size=28, vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=1,
        boi_token_index=297, eoi_token_index=298, image_token_index=299,
    )


def gemma3_multimodal():
    """Only writes the multimodal Gemma 3 fixture (ATOLL_FIXTURE=gemma3-multimodal-tiny runs just
    this, leaving the committed fixtures untouched)."""
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    m = Gemma3ForConditionalGeneration(gemma3_multimodal_config()); randomize(m, 7)
    save(m, "gemma3-multimodal-tiny", seed=107)


def real_counts():
    """Tensor element counts of the released 12B and 27B layouts, built by transformers on the meta
    device (no weights): every state_dict entry, i.e. what the checkpoint files hold."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    def count(model):
        sd = model.state_dict()
        tied = getattr(model.config, "tie_word_embeddings", True)
        return sum(t.numel() for k, t in sd.items() if not (tied and k.endswith("lm_head.weight")))

    layer_types = (["sliding_attention"] * 5 + ["full_attention"]) * 8
    g3 = Gemma3Config(
        text_config=dict(
            vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
            num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
            sliding_window=1024, layer_types=layer_types,
        ),
        vision_config=dict(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
            patch_size=14, image_size=896, vision_use_head=False,
        ),
    )
    g3_27b = Gemma3Config(
        text_config=dict(
            vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
            num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168,
            sliding_window=1024,
            layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 10 + ["sliding_attention"] * 2,
        ),
        vision_config=dict(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
            patch_size=14, image_size=896, vision_use_head=False,
        ),
    )
    g4 = Gemma4UnifiedConfig(
        text_config=dict(
            vocab_size=262144, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
            num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
            num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=1024,
            layer_types=layer_types, final_logit_softcapping=30.0,
        ),
        vision_config=dict(mm_embed_dim=3840, mm_posemb_size=1120, output_proj_dims=3840),
        audio_config=dict(audio_embed_dim=640),
    )
    with torch.device("meta"):
        counts = {
            "gemma3-12b": count(Gemma3ForConditionalGeneration(g3)),
            "gemma4-12b": count(Gemma4UnifiedForConditionalGeneration(g4)),
            "gemma3-27b": count(Gemma3ForConditionalGeneration(g3_27b)),
        }
    with open(os.path.join(OUT, "param_counts.json"), "w") as f:
        json.dump(counts, f, indent=2)
    print("tensor element counts of the released layouts:", counts)


if __name__ == "__main__":
    if os.environ.get("ATOLL_FIXTURE") == "gemma3-multimodal-tiny":
        gemma3_multimodal()
    elif os.environ.get("ATOLL_COUNTS_ONLY"):
        real_counts()
    else:
        main()
