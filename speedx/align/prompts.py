"""The judge prompt of the preference stage and the check of its verdict (wording is ours)."""

from __future__ import annotations


VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"reason": {"type": "string"}, "best": {"type": "integer"}, "worst": {"type": "integer"}},
    "required": ["reason", "best", "worst"],
    "additionalProperties": False,
}


def judge_messages(generation_prompt: str, candidates: list[str]) -> list[dict]:
    numbered = "\n\n".join(f"Candidate {i}:\n{text}" for i, text in enumerate(candidates, start=1))
    content = (
        "Below is a request for one example of embedding training data, followed by several candidate answers "
        "written by a student model.\n\n"
        f"Request:\n{generation_prompt}\n\n{numbered}\n\n"
        "Judge the candidates on how well each follows the request: valid JSON with exactly the requested fields, "
        "relevance to the task, every guideline respected, a positive that truly matches and a negative that "
        "looks related but is less useful, fluent and specific text. Pick the single best and the single worst.\n"
        f'Return only a JSON object {{"reason": "<one or two sentences>", "best": <1-{len(candidates)}>, '
        f'"worst": <1-{len(candidates)}>}} where best and worst differ.'
    )
    return [{"role": "user", "content": content}]


def check_verdict(verdict: dict, num_candidates: int) -> tuple[int, int]:
    """(best, worst) as 0-based indices; ValueError says what is wrong (fed back to the judge on retry)."""
    picks = []
    for key in ("best", "worst"):
        value = verdict.get(key)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_candidates:
            raise ValueError(f'"{key}" must be a candidate number from 1 to {num_candidates}, got {value!r}')
        picks.append(value - 1)
    if picks[0] == picks[1]:
        raise ValueError('"best" and "worst" must be different candidates')
    return picks[0], picks[1]


def retry_messages(messages: list[dict], reply: str, problem: str) -> list[dict]:
    """The same conversation plus the invalid reply and what to fix: a new request, so a deterministic
    (temperature 0) judge can answer differently, and its cache key differs from the first try."""
    return messages + [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": f"That answer cannot be used: {problem}. Reply again with only the JSON object."},
    ]
