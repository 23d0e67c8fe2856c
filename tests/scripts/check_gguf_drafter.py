"""Checks Atoll's GGUF export of an MTP drafter against llama.cpp's own converter (run by
tests/tests/export.rs).

usage: check_gguf_drafter.py REFERENCE_GGUF TOKENIZER_JSON GGUF...

REFERENCE_GGUF is llama.cpp's convert_hf_to_gguf.py output for the same drafter, in f32 and without
a vocabulary (tests/fixtures/gemma4-assistant-tiny/llama-cpp-f32.gguf, written by
scripts/make_drafter_gguf_fixture.py). Each GGUF (Atoll's export, named <anything>-<quant>.gguf)
is read back with the gguf package:
- `general.architecture` is `gemma4-assistant` in both, and the model keys (every key under that
  prefix) are the same set with the same values and value types, but for `vocab_size`, which
  Atoll writes (as for every model it exports) and llama.cpp's Gemma converters leave to the
  length of the token list;
- the tokenizer keys embed TOKENIZER_JSON as a `gpt2` vocabulary of the model's size;
- the tensors are the same names and dims; 1-D tensors are f32 and bit-equal to the reference's;
  2-D tensors are in the export's quant type (f16 where a row is not whole 32-value blocks, as the
  converter falls back) and bit-equal to gguf.quants.quantize (ggml's reference encoders) of the
  reference's f32 values: for the f32 export, the reference's bytes themselves.
"""
import json
import os
import sys

import numpy as np

from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf_quant import encoded_as, expected_type

ARCH = "gemma4-assistant"
QUANTS = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}

reference_path, tokenizer_path, exports = sys.argv[1], sys.argv[2], sys.argv[3:]


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAIL: {what}")


def field(reader, key):
    f = reader.get_field(key)
    return f.contents(), [int(t) for t in f.types]


def model_keys(reader):
    return {k for k in reader.fields if k.startswith(ARCH + ".")}


ref = GGUFReader(reference_path)
check(field(ref, "general.architecture")[0] == ARCH, f"reference architecture {field(ref, 'general.architecture')}")
ref_keys = model_keys(ref)
ref_tensors = {t.name: t for t in ref.tensors}
check(all(t.tensor_type == Q.F32 for t in ref.tensors), "the reference is not all f32")

with open(tokenizer_path) as f:
    tokenizer_json = json.load(f)
tok_by_id = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
tok_by_id.update({t["id"]: t["content"] for t in tokenizer_json["added_tokens"]})

check(exports, "no GGUF to check")
for path in exports:
    name = os.path.basename(path)
    quant = name.rsplit("-", 1)[-1].removesuffix(".gguf")
    check(quant in QUANTS, f"{name}: no quant type in the name")
    qtype = QUANTS[quant]
    ours = GGUFReader(path)
    check(field(ours, "general.architecture")[0] == ARCH, f"{name}: architecture {field(ours, 'general.architecture')}")
    check(field(ours, "general.file_type")[0] == FILE_TYPES[quant], f"{name}: general.file_type")
    keys = model_keys(ours) - {f"{ARCH}.vocab_size"}
    check(keys == ref_keys, f"{name}: model keys differ from llama.cpp's: only Atoll {sorted(keys - ref_keys)}, "
                            f"only llama.cpp {sorted(ref_keys - keys)}")
    for key in sorted(ref_keys):
        got, want = field(ours, key), field(ref, key)
        check(got == want, f"{name}: {key} = {got}, llama.cpp writes {want}")

    vocab = int(ref_tensors["token_embd.weight"].shape[1])
    check(field(ours, f"{ARCH}.vocab_size")[0] == vocab, f"{name}: vocab_size")
    check(field(ours, "tokenizer.ggml.model")[0] == "gpt2", f"{name}: tokenizer model")
    tokens = field(ours, "tokenizer.ggml.tokens")[0]
    check(tokens == [tok_by_id.get(i, f"[PAD{i}]") for i in range(vocab)], f"{name}: tokenizer tokens")

    read = {t.name: t for t in ours.tensors}
    check(sorted(read) == sorted(ref_tensors),
          f"{name}: tensors differ from llama.cpp's: {sorted(set(read) ^ set(ref_tensors))}")
    for tname, r in ref_tensors.items():
        t = read[tname]
        check(list(t.shape) == list(r.shape), f"{name}: {tname} dims {list(t.shape)}, llama.cpp {list(r.shape)}")
        want = np.asarray(r.data)
        if want.ndim == 1:
            check(t.tensor_type == Q.F32 and np.array_equal(np.asarray(t.data).view(np.uint8), want.view(np.uint8)),
                  f"{name}: {tname} is not llama.cpp's f32 values")
            continue
        ty = expected_type(qtype, want)
        check(t.tensor_type == ty, f"{name}: {tname} type {t.tensor_type.name}, expected {ty.name}")
        check(encoded_as(t, want, qtype), f"{name}: {tname} bytes differ from llama.cpp's values in {ty.name}")
    print(f"{name}: {len(read)} tensors and {len(keys)} model keys equal llama.cpp's converter's")
print("ok")
