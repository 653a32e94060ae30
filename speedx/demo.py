"""A short generation demo on the embedded default model: `python -m speedx.demo`.

Generates answers to a handful of chat prompts with continuous batching and prints them with
the measured throughput. Use it to check an install end to end.
"""

from __future__ import annotations

import argparse
import time

from speedx.engine.config import EngineConfig

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give three tips for writing a clear search query.",
    "Explain what a hard negative is in contrastive learning, in two sentences.",
    "Name four vegetables that grow well in cold climates.",
    "What does a paged KV cache store?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "Suggest a title for a blog post about small language models.",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="speedx demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4, help="how many times to repeat the prompt set")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.7)
    EngineConfig.add_cli_args(parser)
    args = parser.parse_args(argv)

    from speedx import LLM, SamplingParams

    llm = LLM.from_config(EngineConfig.from_cli_args(args))
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS] * args.copies
    params = SamplingParams(temperature=args.temperature, top_p=0.95, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outputs = llm.chat(conversations, params)
    elapsed = time.perf_counter() - start
    for question, out in zip(QUESTIONS, outputs):
        print(f"\n### {question}\n{out.outputs[0].text.strip()}")
    generated = sum(o.num_output_tokens for o in outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    prompt_tokens = sum(o.num_prompt_tokens for o in outputs)
    print(
        f"\n{len(outputs)} requests, {generated} tokens generated in {elapsed:.1f} s "
        f"({generated / elapsed:.0f} output tokens/s); prefix cache served {cached}/{prompt_tokens} prompt tokens"
    )


if __name__ == "__main__":
    main()
