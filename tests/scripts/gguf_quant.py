"""What both GGUF checks expect of an exported 2-D tensor (imported by check_gguf_gemma4.py and
check_gguf_drafter.py): llama.cpp's converter's type rule, and the bytes of ggml's reference
encoders (gguf.quants.quantize) for the values it should hold."""
import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q


def expected_type(qtype, values):
    """`qtype`, but f16 for a block type whose rows are not whole 32-value blocks, as the
    converter (and Atoll) fall back."""
    return Q.F16 if qtype in (Q.Q8_0, Q.Q4_0) and values.shape[-1] % 32 else qtype


def encoded_as(tensor, values, qtype):
    """Whether the GGUF `tensor` holds `values` (f32, the tensor's shape reversed) encoded in the
    type `expected_type` gives, byte for byte."""
    want = gguf.quants.quantize(values, expected_type(qtype, values))
    return np.array_equal(np.asarray(tensor.data).view(np.uint8).reshape(-1), want.view(np.uint8).reshape(-1))
