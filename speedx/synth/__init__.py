"""Synthesis of embedding training data: task families, prompts, validation, dedup, the generate CLI."""
