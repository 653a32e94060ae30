"""`python -m speedx.embed.mine`: add FAISS-mined hard negatives to embedding training data.

Reads what `python -m speedx.train --data` reads: the examples.jsonl that `python -m speedx.generate`
writes (or its run directory), mined output, or sentence-transformers anchor/positive[/negative] rows.
It searches every query against a candidate corpus with an embedding model and writes the records back
with "negatives" = the mined negatives, hardest first, followed by the existing ones, and
"mined_negative_scores" = the mined ones' cosine scores. Training keeps the first --max-negatives of
them (default 1): the hardest mined negative, or the existing one where mining found none.

Negatives come from 0-based ranks [range-min, range-max) of each query's search results, never a
positive of the query, its own text, or a candidate scoring above margin * the positive's score.
The corpus defaults to every positive and existing negative of the input; --corpus FILE takes a
.jsonl file (a JSON string per line, or objects with "text" and optional "title", e.g. a BEIR
corpus.jsonl) or any other file as plain text, one document per line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from speedx.embed.data import read_records, training_file
from speedx.embed.default_embedder import resolve_embedder
from speedx.embed.mining import SAMPLING, check_settings
from speedx.synth.run_files import numbered_json_lines

EXIT_BAD_INPUT = 2
DEFAULT_INPUT = "speedx-out/examples.jsonl"  # where `python -m speedx.generate` writes by default


def margin_value(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m speedx.embed.mine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=DEFAULT_INPUT, help="examples JSONL to mine for, any file speedx.train reads, "
                   f"or a run directory (its examples.jsonl) (default: {DEFAULT_INPUT})")
    p.add_argument("--out", default=None, help="mined JSONL to write (default: mined.jsonl beside the input file)")
    p.add_argument("--corpus", default=None, help="candidate documents: .jsonl (strings or objects with 'text') or "
                   "a text file with one document per line (default: the input's positives and negatives)")
    p.add_argument("--model", default="default", help="sentence-transformers model directory, or 'default' "
                   "(the bundled all-MiniLM-L6-v2)")
    p.add_argument("--num-negatives", type=int, default=15, help="negatives to mine per query (default 15)")
    p.add_argument("--range-min", type=int, default=2, help="first search rank (0-based) a negative may come "
                   "from; 2 skips the two nearest documents (default 2)")
    p.add_argument("--range-max", type=int, default=200, help="ranks at or past this are never used (default 200; "
                   "capped at 2048 when FAISS searches on GPU)")
    p.add_argument("--margin", type=margin_value, default=0.95, help="drop candidates scoring above margin * the "
                   "positive's score, likely false negatives; 'none' turns it off (default 0.95)")
    p.add_argument("--sampling", choices=SAMPLING, default="top", help="top: the best-ranked allowed candidates; "
                   "random: a seeded sample from the window (default top)")
    p.add_argument("--seed", type=int, default=0, help="seed for --sampling random (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per embedding batch (default 64)")
    p.add_argument("--device", default=None, help="embedding device, e.g. cpu or cuda (default: cuda when "
                   "available); FAISS uses every GPU it has unless this is cpu")
    p.add_argument("--no-instruction-prefix", action="store_true", help="embed queries as they are instead of "
                   "'Instruct: {instruction}\\nQuery: {query}' for records with an instruction")
    p.add_argument("--drop-existing", action="store_true", help="replace the input's negatives instead of "
                   "keeping them after the mined ones")
    p.add_argument("--no-progress", action="store_true", help="hide the embedding progress bars")
    return p


def read_corpus(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"--corpus {path} does not exist")
    if path.suffix not in (".jsonl", ".json"):
        try:
            return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise ValueError(f"--corpus {path} is not UTF-8 text") from None
    texts = []
    for number, item in numbered_json_lines(path):
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            item = f"{item['title']} {item['text']}" if item.get("title") else item["text"]
        if not isinstance(item, str):
            raise ValueError(f"{path}:{number}: must be a JSON string or an object with a string 'text'")
        if item.strip():  # (an empty document is no candidate, as a blank line in a text corpus)
            texts.append(item)
    return texts


def check_arguments(args) -> dict:
    """Everything that can be wrong, checked before the model loads."""
    check_settings(args.num_negatives, args.range_min, args.range_max, args.margin, args.sampling)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if not Path(args.input).exists():
        raise ValueError(f"--input {args.input} does not exist: give the examples.jsonl written by "
                         "python -m speedx.generate, or its run directory")
    source = training_file(args.input)
    records = read_records(source)
    corpus = read_corpus(Path(args.corpus)) if args.corpus else None
    if corpus is not None and not any(t.strip() for t in corpus):
        raise ValueError(f"--corpus {args.corpus} holds no documents")
    if not Path(resolve_embedder(args.model)).is_dir():  # never let a typo become a hub download
        raise ValueError(f"--model {args.model} is not a directory: give 'default' or a local sentence-transformers model")
    if args.device:
        import torch

        try:
            torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if args.device and args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but no CUDA device is available: use --device cpu")
    out = Path(args.out) if args.out else source.with_name("mined.jsonl")
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} would overwrite --input: pass another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the folder of --out {out}: {exc.strerror}") from None
    return {"records": records, "corpus": corpus, "out": out}


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    """Write beside the target, then rename: a killed run never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        checked = check_arguments(args)
        from speedx.embed.mining import build_corpus, load_embedder, mine_hard_negatives

        start = time.perf_counter()
        model = load_embedder(args.model, args.device)
        load_s = time.perf_counter() - start
        records, corpus = checked["records"], checked["corpus"]
        corpus_size = len(set(corpus if corpus is not None else build_corpus(records)))
        start = time.perf_counter()
        mined = mine_hard_negatives(
            records, model=model, corpus=corpus, num_negatives=args.num_negatives, range_min=args.range_min,
            range_max=args.range_max, margin=args.margin, sampling=args.sampling, seed=args.seed,
            batch_size=args.batch_size, device=args.device, instruction_prefix=not args.no_instruction_prefix,
            keep_existing=not args.drop_existing, show_progress_bar=not args.no_progress)
        mine_s = time.perf_counter() - start
        write_jsonl_atomic(checked["out"], mined)
    except (ValueError, FileNotFoundError) as exc:  # FileNotFoundError: the default embedder is not installed
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # unreadable input, unwritable output
        print(f"error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return EXIT_BAD_INPUT

    counts = [len(r["mined_negative_scores"]) for r in mined]
    short = sum(c < args.num_negatives for c in counts)
    print(f"mined {len(mined)} queries against {corpus_size} candidates in {mine_s:.1f} s "
          f"({len(mined) / mine_s:.1f} queries/s; model load {load_s:.1f} s)")
    print(f"mined negatives per query: mean {sum(counts) / len(counts):.2f} of {args.num_negatives} requested; "
          f"{short} queries got fewer")
    print(f"wrote {checked['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
