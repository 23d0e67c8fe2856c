"""transformers 5.23 cannot build a Gemma 4 assistant (MTP drafter): its text config has every
layer KV-shared (`num_kv_shared_layers == num_hidden_layers`, which the assistant config enforces),
and `Gemma4UnifiedTextConfig.kv_sharing_modes` then raises "The set of layer types producing a
cache is different than the set of layer types using them", because it looks for a producer layer
among the model's own layers; an assistant's producers are the target's layers. `patch()` makes
that case return "reuse" for every layer (what the assistant's forward expects) and leaves every
other case to transformers. It does nothing on a transformers that handles the case itself.
"""
from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedTextConfig


def _needs_patch():
    cfg = Gemma4UnifiedTextConfig(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=1,
        num_key_value_heads=1, head_dim=8, global_head_dim=8, layer_types=["sliding_attention", "full_attention"],
        num_kv_shared_layers=2,
    )
    try:
        cfg.kv_sharing_modes
        return False
    except ValueError:
        return True


def patch():
    if not _needs_patch():
        return
    upstream = Gemma4UnifiedTextConfig.kv_sharing_modes

    def kv_sharing_modes(self):
        if self.num_kv_shared_layers and self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return upstream.fget(self)

    Gemma4UnifiedTextConfig.kv_sharing_modes = property(kv_sharing_modes)
