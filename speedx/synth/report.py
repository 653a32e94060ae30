"""Progress bar, end-of-run summary table and the cost section of a synthesis run."""

from __future__ import annotations

import time


class Progress:
    """Examples written (of this shard's slots) with examples/s, output tokens/s and the valid rate."""

    def __init__(self, total: int):
        self.total = total
        self.bar = None
        self.valid = self.finished = self.output_tokens = 0

    def start(self, already_done: int) -> None:
        from tqdm.auto import tqdm

        self.began = time.perf_counter()
        self.bar = tqdm(total=self.total, initial=already_done, desc="examples", unit="ex", dynamic_ncols=True)

    def update(self, record: dict, valid: bool) -> None:
        self.finished += 1
        self.valid += valid
        self.output_tokens += record.get("output_tokens", 0)
        if self.bar is None:
            return
        self.bar.update(int(valid))
        elapsed = max(time.perf_counter() - self.began, 1e-9)
        self.bar.set_postfix_str(
            f"{self.valid / elapsed:.2f} ex/s, {self.output_tokens / elapsed:,.0f} tok/s, "
            f"valid {self.valid / self.finished:.0%}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cost_report(summary: dict, wall_seconds: float, args, device, brainstorm: dict | None = None) -> dict:
    """Device-hours at --gpu-hour-price against the same tokens at a teacher API's prices; the tokens
    include the brainstorm's (its time is in wall_seconds)."""
    tokens, brainstorm = summary["tokens"], brainstorm or {}
    out_tokens = tokens.get("output_tokens", 0) + tokens.get("revisor_output_tokens", 0)
    in_tokens = tokens.get("prompt_tokens", 0) + tokens.get("revisor_prompt_tokens", 0)
    out_tokens += brainstorm.get("output_tokens", 0)
    in_tokens += brainstorm.get("prompt_tokens", 0)
    hours = wall_seconds / 3600
    dollars = hours * args.gpu_hour_price
    api = in_tokens / 1e6 * args.api_price_in + out_tokens / 1e6 * args.api_price_out
    examples = max(summary["examples"], 1)
    return {
        "device": str(device),
        "device_hours": hours,
        "device_hour_price": args.gpu_hour_price,
        "dollars": dollars,
        "dollars_per_million_output_tokens": dollars / max(out_tokens, 1) * 1e6,
        "dollars_per_thousand_examples": dollars / examples * 1e3,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "api_price_in": args.api_price_in,
        "api_price_out": args.api_price_out,
        "api_dollars_same_tokens": api,
        "api_dollars_per_thousand_examples": api / examples * 1e3,
    }


def print_summary(manifest: dict, requested: int) -> None:
    rows = manifest["families"]
    print(f"\n{'family':<16}{'attempts':>9}{'valid':>7}{'dupes':>7}  rejected by reason")
    for name, row in rows.items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(row["rejected"].items(), key=lambda kv: -kv[1])) or "-"
        print(f"{name:<16}{row['requested']:>9}{row['valid']:>7}{row['duplicates']:>7}  {reasons}")
    tokens, cost = manifest["tokens"], manifest["cost"]
    brainstorm = " with the task brainstorm" if manifest["tasks"].get("output_tokens") else ""
    print(
        f"\n{manifest['examples']}/{requested} examples; tokens{brainstorm} in {cost['input_tokens']:,} "
        f"(prefix-cached {tokens.get('cached_tokens', 0):,}), out {cost['output_tokens']:,}; "
        f"wall {manifest['wall_seconds']:.1f} s on {cost['device']}"
    )
    print(
        f"cost: {cost['device_hours']:.4f} device-h x ${cost['device_hour_price']:.2f} = ${cost['dollars']:.4f}; "
        f"${cost['dollars_per_million_output_tokens']:.2f} per 1M output tokens, "
        f"${cost['dollars_per_thousand_examples']:.2f} per 1K examples\n"
        f"      the same tokens at API prices (${cost['api_price_in']}/${cost['api_price_out']} per 1M in/out): "
        f"${cost['api_dollars_same_tokens']:.4f} (${cost['api_dollars_per_thousand_examples']:.2f} per 1K examples)"
    )
