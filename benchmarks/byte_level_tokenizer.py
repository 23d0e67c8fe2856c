#!/usr/bin/env python3
"""Writes a tokenizer.json of the 256 byte-level tokens and no merges: the fixtures' ids are compared
directly, the tokenizer only has to load. usage: byte_level_tokenizer.py OUT"""
import json
import sys

bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
cs, n = bs[:], 0
for b in range(256):
    if b not in bs:
        bs.append(b); cs.append(256 + n); n += 1
json.dump({"version": "1.0", "added_tokens": [], "pre_tokenizer": {"type": "ByteLevel"},
           "model": {"type": "BPE", "vocab": {chr(c): i for i, c in enumerate(cs)}, "merges": []}},
          open(sys.argv[1], "w"))
