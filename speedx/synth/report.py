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

    def update(self, record: dict, valid: bool, occupancy: float | None = None) -> None:
        self.finished += 1
        self.valid += valid
        self.output_tokens += record.get("output_tokens", 0)
        if self.bar is None:
            return
        self.bar.update(int(valid))
        elapsed = max(time.perf_counter() - self.began, 1e-9)
        batch = "" if occupancy is None else f", batch {occupancy:.0%} full"
        self.bar.set_postfix_str(
            f"{self.valid / elapsed:.2f} ex/s, {self.output_tokens / elapsed:,.0f} tok/s, "
            f"kept {self.valid / self.finished:.0%} of attempts{batch}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BrainstormProgress:
    """Brainstorm requests finished, with how many answered with usable tasks and output tokens/s."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.began = time.perf_counter()
        self.output_tokens = self.usable = 0
        self.bar = tqdm(total=total, desc="brainstorm", unit="req", dynamic_ncols=True)

    def update(self, output_tokens: int, usable: bool) -> None:
        self.output_tokens += output_tokens
        self.usable += usable
        elapsed = max(time.perf_counter() - self.began, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix_str(f"{self.usable} with tasks, {self.output_tokens / elapsed:,.0f} tok/s")

    def close(self) -> None:
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
    totals = {
        "device": str(device),
        "device_hours": hours,
        "device_hour_price": args.gpu_hour_price,
        "dollars": hours * args.gpu_hour_price,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "api_price_in": args.api_price_in,
        "api_price_out": args.api_price_out,
        "api_dollars_same_tokens": in_tokens / 1e6 * args.api_price_in + out_tokens / 1e6 * args.api_price_out,
    }
    return with_rates(totals, summary["examples"])


SUMMED_COST_KEYS = ("device_hours", "dollars", "input_tokens", "output_tokens", "api_dollars_same_tokens")


def merge_costs(costs: list[dict], examples: int) -> dict:
    """The cost of shards taken together: their totals summed, the rates taken again over the merged
    examples; a price or device that differs between shards is listed."""
    merged = {key: sum(cost[key] for cost in costs) for key in SUMMED_COST_KEYS}
    for key in ("device", "device_hour_price", "api_price_in", "api_price_out"):
        values = list(dict.fromkeys(cost[key] for cost in costs))
        merged[key] = values[0] if len(values) == 1 else values
    return with_rates(merged, examples)


def with_rates(totals: dict, examples: int) -> dict:
    examples = max(examples, 1)
    return totals | {
        "dollars_per_million_output_tokens": totals["dollars"] / max(totals["output_tokens"], 1) * 1e6,
        "dollars_per_thousand_examples": totals["dollars"] / examples * 1e3,
        "api_dollars_per_thousand_examples": totals["api_dollars_same_tokens"] / examples * 1e3,
    }


def print_summary(manifest: dict, requested: int) -> None:
    rows = manifest["families"]
    print(f"\n{'family':<16}{'attempts':>9}{'valid':>7}{'dupes':>7}  rejected by reason")
    for name, row in rows.items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(row["rejected"].items(), key=lambda kv: -kv[1])) or "-"
        print(f"{name:<16}{row['requested']:>9}{row['valid']:>7}{row['duplicates']:>7}  {reasons}")
    tokens, cost = manifest["tokens"], manifest["cost"]
    if "export" in manifest:
        print("sentence-transformers export: " + ", ".join(
            f"{name}.jsonl/.parquet {count} rows" if count else f"no {name} (no rows, no files)"
            for name, count in manifest["export"].items()))
    brainstorm = " with the task brainstorm" if manifest["tasks"].get("output_tokens") else ""
    if manifest.get("empty_slots"):
        print(f"empty slots: {manifest['empty_slots']}")
    occupancy = manifest.get("occupancy") or {}
    if occupancy.get("mean") is not None:
        tenths = " ".join("-" if f is None else f"{f:.0%}" for f in occupancy["by_tenth_of_time"])
        print(f"batch occupancy {occupancy['mean']:.0%} of the starting batch; by tenth of the run: {tenths}")
    print(
        f"\n{manifest['examples']}/{requested} examples; tokens{brainstorm} in {cost['input_tokens']:,} "
        f"(prefix-cached {tokens.get('cached_tokens', 0):,}), out {cost['output_tokens']:,}; "
        f"wall {manifest['wall_seconds']:.1f} s on {cost['device']}"
    )
    price = cost["device_hour_price"]  # merged shards may have run at several prices
    price = f"${price:.2f}" if isinstance(price, (int, float)) else "/".join(f"${p:.2f}" for p in price)
    print(
        f"cost: {cost['device_hours']:.4f} device-h x {price} = ${cost['dollars']:.4f}; "
        f"${cost['dollars_per_million_output_tokens']:.2f} per 1M output tokens, "
        f"${cost['dollars_per_thousand_examples']:.2f} per 1K examples\n"
        f"      the same tokens at API prices (${cost['api_price_in']}/${cost['api_price_out']} per 1M in/out): "
        f"${cost['api_dollars_same_tokens']:.4f} (${cost['api_dollars_per_thousand_examples']:.2f} per 1K examples)"
    )
