#!/usr/bin/env python3
"""Neutral streaming load generator for any OpenAI-compatible server (`/v1/completions`, or `/v1/chat/completions` with --chat).

N clients send streaming completions back to back for a fixed time (greedy, `max_tokens` new
tokens, the same prompts for every server) and the run reports aggregate output tokens/s, TTFT
and inter-token latency percentiles. Standard library only (asyncio + HTTP/1.1, chunked or
identity bodies), so it runs the same against Tessera's router and llama-server and needs
nothing installed. Bounded in count and time; targets a loopback URL.

    python3 bench/http_load.py --url http://127.0.0.1:3000 --clients 32 --duration 30
"""

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

# Prompts SmolLM2-135M-Instruct continues past 64 tokens under greedy decoding (no early EOS), so
# both servers generate the same number of tokens per request.
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The history of the Roman Empire begins with",
    "Here is a list of ten interesting facts about the ocean:\n1.",
    "Rainbows form when sunlight",
]


# Chat questions, sampled at the default temperature (--chat): answers end (EOS) at lengths of
# their own.
QUESTIONS = [
    "Write a short poem about the sea.",
    "What is the capital of France? Explain briefly.",
    "Give me three tips for learning a new language.",
    "Explain in two sentences why the sky is blue.",
    "Describe your ideal weekend.",
    "What are the benefits of regular exercise?",
]


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


async def read_body(reader, headers):
    """Yields body bytes as they arrive, decoding chunked transfer encoding."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            if not size_line:
                return
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    else:
        length = headers.get("content-length")
        remaining = int(length) if length is not None else None
        while remaining is None or remaining > 0:
            data = await reader.read(65536 if remaining is None else min(65536, remaining))
            if not data:
                return
            if remaining is not None:
                remaining -= len(data)
            yield data


async def one_request(url, prompt, max_tokens, api_key, chat=False):
    """One streaming completion: (ok, output tokens, ttft s, [inter-token gaps s], error)."""
    u = urlsplit(url)
    route = "/v1/chat/completions" if chat else "/v1/completions"
    request = {
        "model": "default",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat:
        # As a chat client sends it: the API's default temperature (1), so answers end at lengths
        # of their own.
        request["messages"] = [{"role": "user", "content": prompt}]
    else:
        request["prompt"] = prompt
        request["temperature"] = 0
    if max_tokens > 0:
        request["max_tokens"] = max_tokens
    body = json.dumps(request).encode()
    head = [
        f"POST {u.path.rstrip('/')}{route} HTTP/1.1",
        f"Host: {u.netloc}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if api_key:
        head.append(f"Authorization: Bearer {api_key}")
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(u.hostname, u.port or 80)
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        status = (await reader.readline()).decode(errors="replace").split()
        headers = {}
        while True:
            line = (await reader.readline()).decode(errors="replace").strip()
            if not line:
                break
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if len(status) < 2 or status[1] != "200":
            text = b"".join([c async for c in read_body(reader, headers)])[:200]
            return False, 0, None, [], f"HTTP {' '.join(status[1:])}: {text!r}"
        buf, events, usage, times = b"", 0, None, []
        async for chunk in read_body(reader, headers):
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    msg = json.loads(data)
                    if msg.get("usage"):
                        usage = msg["usage"].get("completion_tokens", usage)
                    if msg.get("choices"):
                        events += 1
                        times.append(time.perf_counter())
        if not times:
            return False, 0, None, [], "no token events"
        tokens = usage if usage is not None else events
        gaps = [b - a for a, b in zip(times, times[1:])]
        return True, tokens, times[0] - start, gaps, None
    finally:
        writer.close()


async def run(args):
    ok, failed, tokens, ttft, itl, errors = 0, 0, 0, [], [], {}
    # One request first so a lazily initialised server is not charged to the first clients.
    prompts = QUESTIONS if args.chat else PROMPTS
    warm = await one_request(args.url, prompts[0], 4, args.api_key, args.chat)
    if not warm[0]:
        print(f"warm-up request failed: {warm[4]}", file=sys.stderr)
        return 1
    deadline = time.perf_counter() + args.duration
    started = time.perf_counter()

    async def client(i):
        nonlocal ok, failed, tokens
        n = i
        while time.perf_counter() < deadline:
            prompt = prompts[n % len(prompts)]
            r = await one_request(args.url, prompt, args.max_tokens, args.api_key, args.chat)
            n += args.clients
            if r[0]:
                ok += 1
                tokens += r[1]
                ttft.append(r[2])
                itl.extend(r[3])
            else:
                failed += 1
                errors[r[4]] = errors.get(r[4], 0) + 1

    await asyncio.gather(*(client(i) for i in range(args.clients)))
    wall = time.perf_counter() - started
    result = {
        "label": args.label,
        "clients": args.clients,
        "requests": ok,
        "failed": failed,
        "output_tokens": tokens,
        "tokens_per_request": tokens / ok if ok else 0,
        "wall_s": round(wall, 2),
        "output_tok_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(percentile(ttft, 50) * 1e3, 1),
        "ttft_p99_ms": round(percentile(ttft, 99) * 1e3, 1),
        "itl_p50_ms": round(percentile(itl, 50) * 1e3, 1),
        "itl_p99_ms": round(percentile(itl, 99) * 1e3, 1),
    }
    if errors:
        result["errors"] = errors
    print(json.dumps(result))
    return 0 if ok and not failed else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    p.add_argument("--max-tokens", type=int, default=64, help="0: send none (the server's limit)")
    p.add_argument("--api-key")
    p.add_argument("--chat", action="store_true", help="chat questions on /v1/chat/completions")
    p.add_argument("--label", default="")
    args = p.parse_args()
    host = urlsplit(args.url).hostname or ""
    if not (host == "localhost" or host.startswith("127.") or host == "::1"):
        p.error("load goes to loopback addresses only")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
