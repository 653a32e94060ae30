"""Chat prompts for generation, brainstorming and revision (wording is ours)."""

from __future__ import annotations

import json
import random
import string

from speedx.synth.families import Family


def _fill(template: str, knobs: dict[str, str]) -> str | None:
    """Fill {knob} placeholders; None when a placeholder's knob was not sampled."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    if any(name not in knobs for name in names):
        return None
    return template.format(**knobs)


def guideline_bullets(family: Family, knobs: dict[str, str], rng: random.Random) -> list[str]:
    bullets = [text for text in (_fill(g, knobs) for g in family.guidelines) if text]
    bullets += [g for g in family.optional_guidelines if rng.random() < 0.5]
    rng.shuffle(bullets)
    return bullets


def generation_messages(family: Family, task: str, knobs: dict[str, str], rng: random.Random) -> list[dict]:
    keys = "\n".join(f'- "{key}": {meaning}' for key, meaning, _ in family.fields)
    bullets = "\n".join(f"- {b}" for b in guideline_bullets(family, knobs, rng))
    content = (
        f"You write training data for text embedding models. Create {family.summary}.\n\n"
        f"Task: {task}\n\n"
        f"Return one JSON object with exactly these string fields:\n{keys}\n\n"
        f"Guidelines:\n{bullets}\n\n"
        "Output only the JSON object, with no explanation before or after it."
    )
    return [{"role": "user", "content": content}]


def brainstorm_messages(family: Family, topic: str, count: int = 3) -> list[dict]:
    examples = "\n".join(f"- {t}" for t in family.example_tasks)
    content = (
        f"Topic: {topic}\n\n"
        f"Brainstorm {count} different {family.brainstorm_hint}, all about the topic above. "
        "Each task definition is one sentence of about ten words.\n\n"
        f"Examples of the form (other topics):\n{examples}\n\n"
        f'Return a JSON object {{"tasks": [...]}} with {count} strings and nothing else.'
    )
    return [{"role": "user", "content": content}]


def brainstorm_schema(count: int = 3) -> dict:
    return {
        "type": "object",
        "properties": {"tasks": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": count}},
        "required": ["tasks"],
        "additionalProperties": False,
    }


def revision_messages(family: Family, task: str, generation_prompt: str, example: dict) -> list[dict]:
    content = (
        "Here is a request for embedding training data and the example that was written for it.\n\n"
        f"Request:\n{generation_prompt}\n\n"
        f"Example:\n{json.dumps(example, ensure_ascii=False)}\n\n"
        "Check the example against the request: is every field relevant to the task, complete and accurate, and "
        "does it follow every guideline? Rewrite it once so that it does, keeping what is already good. "
        f"Return only the revised JSON object with exactly the fields {', '.join(family.keys)}."
    )
    return [{"role": "user", "content": content}]
