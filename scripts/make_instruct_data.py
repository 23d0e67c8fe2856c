#!/usr/bin/env python3
"""Builds data/shakespeare-instruct.jsonl, the instruction set `make finetune-demo` trains on.

Every answer is real text from data/tinyshakespeare.txt (the corpus Atoll already ships): each
speech of the corpus is a block `SPEAKER:\\n lines`. Three kinds of chat examples are made from
consecutive speeches, deterministically (seeded):
  - continue: the user gives a speech's opening line(s), the assistant answers with the next lines;
  - speaker:  the user quotes a speech, the assistant names its speaker;
  - reply:    the user quotes a speech (with its speaker), the assistant gives the reply that
              follows it in the play, prefixed by the replying speaker.
Usage: python3 scripts/make_instruct_data.py [corpus] [out]   (standard library only)
"""
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
corpus = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "data" / "tinyshakespeare.txt"
out = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "data" / "shakespeare-instruct.jsonl"
PER_KIND = 500
MAX_CHARS = 300

speeches = []
for block in corpus.read_text(encoding="utf-8").split("\n\n"):
    lines = block.strip("\n").split("\n")
    if len(lines) < 2 or not lines[0].endswith(":"):
        continue
    speeches.append((lines[0][:-1], lines[1:]))

rng = random.Random(20260301)
examples = []


def chat(user, answer, kind):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], "kind": kind}


order = list(range(len(speeches)))
rng.shuffle(order)
counts = {"continue": 0, "speaker": 0, "reply": 0}
for i in order:
    speaker, lines = speeches[i]
    text = "\n".join(lines)
    if counts["continue"] < PER_KIND and 3 <= len(lines) and len(text) <= MAX_CHARS:
        cut = rng.randint(1, len(lines) - 2)
        prompt = "Continue this speech by " + speaker.title() + ":\n" + "\n".join(lines[:cut])
        examples.append(chat(prompt, "\n".join(lines[cut:]), "continue"))
        counts["continue"] += 1
    elif counts["speaker"] < PER_KIND and len(text) <= MAX_CHARS and speaker not in ("All", "Both"):
        examples.append(chat("Who says this?\n" + text, speaker, "speaker"))
        counts["speaker"] += 1
    elif counts["reply"] < PER_KIND and i + 1 < len(speeches):
        nxt_speaker, nxt_lines = speeches[i + 1]
        reply = "\n".join(nxt_lines)
        if len(text) + len(reply) <= MAX_CHARS:
            prompt = speaker + " says:\n" + text + "\nWhat is the reply?"
            examples.append(chat(prompt, nxt_speaker + ":\n" + reply, "reply"))
            counts["reply"] += 1
    if all(c >= PER_KIND for c in counts.values()):
        break

rng.shuffle(examples)
with out.open("w", encoding="utf-8") as f:
    for ex in examples:
        ex.pop("kind")
        f.write(json.dumps(ex, ensure_ascii=False) + "\n")
print(f"{out}: {len(examples)} examples {counts}")
