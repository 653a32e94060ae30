"""The run directory's sentence-transformers export loads with `datasets` and trains with
sentence-transformers, also when one of its splits has no rows."""

from __future__ import annotations

import pytest

from speedx.synth.records import export_sentence_transformers


def example(i: int, negatives: list[str]) -> dict:
    return {"instruction": "Retrieve semantically similar text.", "query": f"query {i} about parks",
            "positive": f"a park answer {i}", "negatives": negatives}


def load(path):
    from datasets import load_dataset

    return load_dataset("json" if path.suffix == ".jsonl" else "parquet", data_files=str(path), split="train")


def test_both_splits_load_with_their_columns(tmp_path):
    examples = [example(0, ["a trains answer"]), example(1, []), example(2, ["a boats answer"])]
    assert export_sentence_transformers(examples, tmp_path) == {"triplets": 2, "pairs": 1}
    for suffix in (".jsonl", ".parquet"):
        triplets, pairs = load(tmp_path / f"triplets{suffix}"), load(tmp_path / f"pairs{suffix}")
        assert triplets.column_names == ["anchor", "positive", "negative"] and triplets.num_rows == 2
        assert pairs.column_names == ["anchor", "positive"] and pairs.num_rows == 1
        assert triplets[0]["anchor"] == "Instruct: Retrieve semantically similar text.\nQuery: query 0 about parks"
        assert pairs[0]["positive"] == "a park answer 1"


def test_a_split_without_rows_has_no_files_not_unreadable_ones(tmp_path):
    export_sentence_transformers([example(0, []), example(1, ["x"])], tmp_path)  # an earlier export had pairs
    assert export_sentence_transformers([example(0, ["x"])], tmp_path) == {"triplets": 1, "pairs": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["triplets.jsonl", "triplets.parquet"]
    assert export_sentence_transformers([], tmp_path) == {"triplets": 0, "pairs": 0}
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("split", ["triplets", "pairs"])
def test_an_exported_split_trains_a_sentence_transformer(tmp_path, split):
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from speedx.embed.default_embedder import resolve_embedder

    export_sentence_transformers([example(i, ["a trains answer"] if split == "triplets" else []) for i in range(4)],
                                 tmp_path / "export")
    model = SentenceTransformer(resolve_embedder("default"), device="cpu")
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                                                report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=load(tmp_path / "export" / f"{split}.parquet"),
                                         loss=MultipleNegativesRankingLoss(model))
    assert trainer.train().global_step == 1
