#!/usr/bin/env python3
"""Converts the tiny MTP drafter fixture (tests/fixtures/gemma4-assistant-tiny) to GGUF with
llama.cpp's own converter, as the reference `atoll export --format drafter-gguf` is checked against
(tests/tests/export.rs, tests/scripts/check_gguf_drafter.py).

Output: tests/fixtures/gemma4-assistant-tiny/llama-cpp-f32.gguf, every weight in f32 and no
vocabulary: llama.cpp's Gemma 4 converter embeds only Gemma's own (SentencePiece-style) tokenizer,
while Atoll's exports embed its byte-level BPE; both write the same model keys and tensors.

The converter is the one llama-cpp-python 0.3.36 vendors (the llama.cpp the GGUF benchmark runs,
benchmarks/gguf_llama_cpp.sh): its source distribution is downloaded from PyPI once (sha256
checked) into ~/.cache/atoll/. Run with the reference venv's Python (torch, transformers 5.23):
    ~/.cache/atoll/reference-venv/bin/python scripts/make_drafter_gguf_fixture.py
"""
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

VERSION = "0.3.36"
ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "gemma4-assistant-tiny"
OUT = FIXTURE / "llama-cpp-f32.gguf"
CACHE = Path(os.environ.get("ATOLL_CACHE", Path.home() / ".cache" / "atoll"))


def llama_cpp_source() -> Path:
    """llama.cpp as vendored by llama-cpp-python's sdist, downloaded and unpacked once."""
    src = CACHE / f"llama-cpp-python-{VERSION}-src"
    vendored = src / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if vendored.is_dir():
        return vendored
    with urllib.request.urlopen(f"https://pypi.org/pypi/llama-cpp-python/{VERSION}/json") as r:
        release = json.load(r)
    sdist = next(u for u in release["urls"] if u["packagetype"] == "sdist")
    print(f"downloading {sdist['filename']} ({sdist['size'] >> 20} MiB) from PyPI", file=sys.stderr)
    with urllib.request.urlopen(sdist["url"]) as r:
        data = r.read()
    if hashlib.sha256(data).hexdigest() != sdist["digests"]["sha256"]:
        sys.exit(f"{sdist['filename']}: sha256 does not match PyPI's")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=CACHE, prefix=".llama-cpp-src-"))
    try:
        archive = partial / sdist["filename"]
        archive.write_bytes(data)
        with tarfile.open(archive) as tar:
            tar.extractall(partial, filter="data")
        archive.unlink()
        partial.rename(src)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return vendored


def byte_level_tokenizer() -> dict:
    """A 256-token byte-level BPE: the converter counts its tokens to trim the embedding rows
    (256 = the fixture's vocabulary, so nothing is trimmed)."""
    def printable(b):
        return 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255
    alphabet, extra = [], 0
    for b in range(256):
        if printable(b):
            alphabet.append(chr(b))
        else:
            extra += 1
            alphabet.append(chr(255 + extra))
    return {
        "version": "1.0",
        "added_tokens": [],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(alphabet)}, "merges": []},
    }


def main():
    llama_cpp = llama_cpp_source()
    sys.path[:0] = [str(llama_cpp / "gguf-py"), str(llama_cpp)]
    import convert_hf_to_gguf
    from conversion.gemma import Gemma4AssistantModel

    # Gemma 4's converter embeds only a Gemma (byte-fallback BPE) tokenizer; the model keys and
    # tensors are what is compared, so the vocabulary is left out.
    Gemma4AssistantModel.set_vocab = lambda self: None
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "gemma4-assistant-tiny"
        shutil.copytree(FIXTURE, model, ignore=shutil.ignore_patterns("reference.safetensors", "*.gguf"))
        (model / "tokenizer.json").write_text(json.dumps(byte_level_tokenizer()))
        # The converter looks up the MoE width unconditionally: gemma4's text config writes it (as
        # null on dense models), gemma4_unified's has no such field, so the lookup fails without it.
        config = json.loads((model / "config.json").read_text())
        config["text_config"].setdefault("moe_intermediate_size", None)
        (model / "config.json").write_text(json.dumps(config, indent=2))
        sys.argv = ["convert_hf_to_gguf.py", str(model), "--outtype", "f32", "--outfile", str(OUT)]
        convert_hf_to_gguf.main()
    print(f"wrote {OUT.relative_to(ROOT)} with llama.cpp's converter (llama-cpp-python {VERSION})")


if __name__ == "__main__":
    main()
