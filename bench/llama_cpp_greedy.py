#!/usr/bin/env python3
"""llama.cpp's own greedy ids for the SmolLM2 reference prompts, as a test fixture.

Asks a running llama-server (`/completion`) to continue each case of
tests/fixtures/smollm2/reference.json from the case's own prompt ids (a token-array prompt: no
tokenizer, no BOS added), greedily (`temperature` 0, `top_k` 1, the top-k sampler only), for the
case's `new_tokens`, stopping at EOS only where the case does. Writes the fixture JSON to stdout.

    python3 bench/llama_cpp_greedy.py --url http://127.0.0.1:8090 --version 0.3.36 \
        --model smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > tests/fixtures/smollm2/llama_cpp_greedy.json
"""

import argparse
import json
import os
import sys
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def complete(url, prompt_ids, n, stop_at_eos):
    body = {
        "prompt": prompt_ids,
        "n_predict": n,
        "temperature": 0,
        "top_k": 1,
        "samplers": ["top_k"],
        "ignore_eos": not stop_at_eos,
        "cache_prompt": False,
        "return_tokens": True,
        "stream": False,
    }
    req = urllib.request.Request(
        url.rstrip("/") + "/completion",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.load(r)
    evaluated = out.get("tokens_evaluated")
    if evaluated is not None and evaluated != len(prompt_ids):
        sys.exit(f"llama-server evaluated {evaluated} prompt tokens, sent {len(prompt_ids)}")
    return out["tokens"], out.get("content", "")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8090")
    p.add_argument("--version", required=True, help="llama-cpp-python sdist version")
    p.add_argument("--model", required=True, help="the GGUF, relative to .cache/models")
    p.add_argument("--command", default="", help="how llama-server was started")
    args = p.parse_args()
    with open(os.path.join(ROOT, "tests/fixtures/smollm2/reference.json")) as f:
        reference = json.load(f)
    cases = []
    for case in reference["cases"]:
        ids, text = complete(args.url, case["prompt_ids"], case["new_tokens"], case["stop_at_eos"])
        cases.append(
            {
                "name": case["name"],
                "prompt_ids": case["prompt_ids"],
                "new_tokens": case["new_tokens"],
                "stop_at_eos": case["stop_at_eos"],
                "generated_ids": ids,
                "generated_text": text,
            }
        )
    fixture = {
        "model": args.model,
        "engine": f"llama.cpp vendored in llama-cpp-python {args.version} (PyPI sdist), CPU, "
        "greedy (temperature 0, top_k 1), token-array prompts",
        "server_command": args.command,
        "cases": cases,
    }
    json.dump(fixture, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
