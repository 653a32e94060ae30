"""Output tokens/s of the OpenAI-compatible server under N concurrent clients next to the bare engine.

The same chat prompts with the same sampling params run through `LLM.chat` in this process (the
bare engine: all prompts queued at once) and through the server (`python -m speedx.serve` in a
child process; or, with --in-process, `speedx.serving.start_server` in this one, whose engine loop
runs in a background thread) with --concurrency closed-loop httpx clients on /v1/chat/completions
(each sends its next prompt when the previous answer is back). Both sides batch at most
--concurrency sequences (max_num_seqs). EOS is ignored (`ignore_eos`, a vLLM-style extension field)
so every answer has exactly --output-len tokens. The clients share the 2 cores with the server, so
their CPU time counts against it: the overhead reported is an upper bound. Engine and server runs
alternate; medians over --repeats after a warm-up; JSON out.

Wall-clock ratios on a shared machine are noisy (another process on one of the cores can slow the
engine's torch threads several-fold), so the CPU seconds of each run are reported too: the engine
process, the server process and the clients.

    python bench/serve.py                      # ~3 min on 2 CPU cores with the default model
    python bench/serve.py --stream             # also streaming clients (one SSE chunk per token)
    python bench/serve.py --in-process         # start_server's engine thread instead of the CLI server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from throughput import device_name

from speedx import LLM, SamplingParams
from speedx.engine.config import EngineConfig
from speedx.serving import start_server

TOPICS = ["robots that paint", "tide pools", "the history of maps", "sourdough bread", "solar sails", "chess openings",
          "desert plants", "jazz drumming", "glaciers", "paper folding", "city bees", "old lighthouses",
          "night trains", "volcanic islands", "handwriting", "coral reefs"]
STYLES = ["Write a short story about {}.", "Explain {} to a child.", "List three surprising facts about {}.",
          "Write a haiku and a limerick about {}."]


def conversations(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": STYLES[i % len(STYLES)].format(TOPICS[i % len(TOPICS)])}] for i in range(count)]


def params_for(i: int, args) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.output_len, seed=i,
                          ignore_eos=True)


def cpu_seconds(pid: int | str = "self") -> float:
    """CPU seconds (user + system, all threads) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CLIServer:
    """`python -m speedx.serve` in a child process, on a free port."""

    def __init__(self, config: EngineConfig):
        command = [sys.executable, "-m", "speedx.serve", *config.cli_args(), "--port", "0",
                   "--served-model-name", "bench", "--log-level", "warning"]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        for line in self.process.stderr:  # wait for "speedx: serving 'bench' at http://HOST:PORT/v1"
            if line.startswith("speedx: serving"):
                self.url = line.split(" at ")[1].split()[0]
                break
        else:
            raise RuntimeError(f"the server did not start (exit code {self.process.wait()})")
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # keep draining its log
        self.pid = self.process.pid

    def close(self):
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=60)


class InProcessServer:
    def __init__(self, llm):
        self.running = start_server(llm, served_model_name="bench")
        self.url, self.pid = self.running.url, "self"

    def close(self):
        self.running.close()


def run_engine(llm: LLM, convs, args) -> tuple[float, int, list[str]]:
    start = time.perf_counter()
    outs = llm.chat(convs, [params_for(i, args) for i in range(len(convs))], use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, sum(o.num_output_tokens for o in outs), [o.outputs[0].text for o in outs]


async def run_clients(url: str, model: str, convs, args, stream: bool) -> tuple[float, int, list[str]]:
    texts: list[str | None] = [None] * len(convs)
    tokens = 0
    next_index = 0
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)

    async def client(http: httpx.AsyncClient):
        nonlocal next_index, tokens
        while next_index < len(convs):
            i, next_index = next_index, next_index + 1
            body = {"model": model, "messages": convs[i], "max_tokens": args.output_len, "temperature": args.temperature,
                    "top_p": args.top_p, "seed": i, "ignore_eos": True}
            if not stream:
                reply = (await http.post(url + "/chat/completions", json=body)).raise_for_status().json()
                texts[i] = reply["choices"][0]["message"]["content"]
                tokens += reply["usage"]["completion_tokens"]
                continue
            body.update(stream=True, stream_options={"include_usage": True})
            pieces = []
            async with http.stream("POST", url + "/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        pieces.append(chunk["choices"][0]["delta"].get("content") or "")
                    elif chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            texts[i] = "".join(pieces)

    async with httpx.AsyncClient(limits=limits, timeout=600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(args.concurrency)))
        seconds = time.perf_counter() - start
    return seconds, tokens, texts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients = engine max_num_seqs")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stream", action="store_true", help="also measure streaming clients")
    p.add_argument("--in-process", action="store_true", help="serve with start_server in this process")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    EngineConfig.add_cli_args(p, only=("model", "dtype", "quantization", "kv_cache_dtype", "seed"))
    args = p.parse_args(argv)

    llm = LLM.from_config(EngineConfig.from_cli_args(args, max_num_seqs=args.concurrency))
    server = None if args.in_process else CLIServer(llm.config)  # loads its own copy of the model meanwhile
    convs, warm = conversations(args.num_prompts), conversations(args.concurrency)
    modes = ["engine", "server"] + (["server_stream"] if args.stream else [])
    runs = {mode: [] for mode in modes}  # (seconds, output tokens, {process: CPU seconds}) per run
    texts = {}
    run_engine(llm, warm, args)  # warm-up: allocator, kernels, chat template
    try:
        for _ in range(args.repeats):
            cpu = cpu_seconds()
            seconds, tokens, texts["engine"] = run_engine(llm, convs, args)
            runs["engine"].append((seconds, tokens, {"engine": cpu_seconds() - cpu}))
            print(f"engine          {tokens / seconds:8.1f} output tok/s ({seconds:.1f} s)", flush=True)
            if args.in_process:  # the server owns the engine while it runs
                server = InProcessServer(llm)
            for mode in modes[1:]:
                stream = mode == "server_stream"
                if len(runs[mode]) == 0:  # warm-up: connections, the server's first steps
                    asyncio.run(run_clients(server.url, "bench", warm, args, stream))
                cpu = cpu_seconds(), cpu_seconds(server.pid)
                seconds, tokens, texts[mode] = asyncio.run(run_clients(server.url, "bench", convs, args, stream))
                used = {"clients": cpu_seconds() - cpu[0], "server": cpu_seconds(server.pid) - cpu[1]}
                if args.in_process:  # one process: clients and server are not told apart
                    used = {"clients+server": used["clients"]}
                runs[mode].append((seconds, tokens, used))
                print(f"{mode:15} {tokens / seconds:8.1f} output tok/s ({seconds:.1f} s)", flush=True)
            if args.in_process:
                server.close()
    finally:
        if server is not None:
            server.close()

    expected_tokens = args.num_prompts * args.output_len
    result = {"device": device_name(str(llm.device)), "model": args.model, "dtype": str(llm.dtype).removeprefix("torch."),
              "server": "start_server (in-process, engine thread)" if args.in_process else "python -m speedx.serve",
              "concurrency": args.concurrency, "num_prompts": args.num_prompts, "output_len": args.output_len,
              "temperature": args.temperature, "top_p": args.top_p, "contenders": {}}
    for mode, values in runs.items():
        assert all(tokens == expected_tokens for _, tokens, _ in values), (mode, values)
        seconds = statistics.median(s for s, _, _ in values)
        row = result["contenders"][mode] = {
            "seconds": [s for s, _, _ in values], "median_seconds": seconds, "output_tokens_per_s": expected_tokens / seconds,
            "cpu_seconds": {name: statistics.median(u[name] for _, _, u in values) for name in values[0][2]},
        }
        if mode != "engine":  # seeded sampling is batch-invariant up to float rounding in batched matmuls
            row["same_text_as_engine"] = sum(a == b for a, b in zip(texts[mode], texts["engine"])) / len(convs)
    engine_tps = result["contenders"]["engine"]["output_tokens_per_s"]
    print(f"\n{'contender':15} {'output tok/s':>12} {'overhead':>9}   CPU seconds (median)")
    for mode, row in result["contenders"].items():
        cpu = ", ".join(f"{name} {value:.1f}" for name, value in row["cpu_seconds"].items())
        overhead = ""
        if mode != "engine":
            row["overhead_vs_engine"] = 1 - row["output_tokens_per_s"] / engine_tps
            overhead = f"{row['overhead_vs_engine']:.1%}"
        print(f"{mode:15} {row['output_tokens_per_s']:12.1f} {overhead:>9}   {cpu}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
