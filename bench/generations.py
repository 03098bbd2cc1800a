"""Greedy continuations of prompts, a causal-LM run's teacher and its saved student side by side.

    .venv/bin/python bench/generations.py runs/smollm2_hybrid/model [--teacher smollm2] [--tokens 24]
        [--prompt "..." ...]

Prints a Markdown table (prompt, teacher, student); the default prompts open the held-out genres of
recipes/smollm2_hybrid.yaml (quips and licence text).
"""

from __future__ import annotations

import argparse

import torch

import replacer
from replacer.plugins import get_registry

PROMPTS = [
    "A journey of a thousand miles",
    "Permission is hereby granted, free of charge, to any person obtaining a copy",
    "The best way to predict the future is",
]


@torch.no_grad()
def continuation(model: torch.nn.Module, tokenizer, prompt: str, tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", help="a saved student's folder (runs/<name>/model)")
    parser.add_argument("--teacher", default="smollm2", help="the teacher's model source")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for several); default: three held-out openings")
    args = parser.parse_args()
    tokenizer = get_registry().load_tokenizer(args.teacher)
    models = {"teacher": replacer.load_model(args.teacher).eval(), "student": replacer.load(args.student).eval()}
    print("| prompt | teacher | student |\n|---|---|---|")
    for prompt in args.prompt or PROMPTS:
        cells = [continuation(m, tokenizer, prompt, args.tokens).replace("\n", " ").replace("|", "\\|") for m in models.values()]
        print(f'| "{prompt}" | "{cells[0]}" | "{cells[1]}" |')


if __name__ == "__main__":
    main()
