"""Suggestions for ``rlhf feedback push``: a reward model from ``rlhf align rm`` scores every candidate and the ranking
it implies is shown to annotators as a hint (score and agent).

The SDK drops the ``rank`` of ranking suggestions exactly as it does for responses (argilla-io/argilla#5712,
field-notes trap 11), and the UI pre-fills a ranking only from ``rank``, so suggestions go over the REST bulk-upsert
endpoint the SDK itself uses.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from feedback.client import FeedbackError, Rest
from feedback.dataset import response_field

if TYPE_CHECKING:
    import argilla as rg

    from feedback.push import Item, PushConfig

# What Argilla accepts as a suggestion's agent (argilla_server.api.schemas.v1.suggestions.AGENT_REGEX).
AGENT_RE = re.compile(r"^[a-zA-Z0-9-_:./\s]*[a-zA-Z0-9][a-zA-Z0-9-_:./\s]*$")


@dataclass
class SuggestionsConfig:
    """The ``suggestions:`` section: pre-rank each record's candidates with a reward model."""

    reward_run: str  # an `rlhf align rm` run folder (run.json + adapter/ or model/)
    agent: Optional[str] = None  # name the UI shows with the suggestion; default: the run folder's name
    batch_size: int = 16  # candidates scored per forward pass

    def __post_init__(self) -> None:
        if not isinstance(self.reward_run, str) or not self.reward_run.strip():
            raise ValueError(f"reward_run: expected an `rlhf align rm` run folder, got {self.reward_run!r}")
        if self.agent is not None and (not isinstance(self.agent, str) or not AGENT_RE.match(self.agent)
                                       or len(self.agent) > 200):
            raise ValueError(f"agent: up to 200 letters, digits, spaces and - _ : . / , got {self.agent!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {self.batch_size!r}")


def reward_scores(cfg: SuggestionsConfig, run_dir: Path, items: list[Item]) -> list[list[float]]:
    """The reward model's score of every candidate, per item, read as in training (``alignment.reward.score``)."""
    from alignment.models import ModelConfig, load_sequence_classifier, load_tokenizer
    from alignment.reward import score
    from alignment.runs import load_run
    from rlhf.config import ConfigError

    try:
        record = load_run(run_dir)
        if record["stage"] != "rm" or record["status"] != "finished":
            raise FeedbackError(f"suggestions.reward_run: {run_dir} is a {record['status']} {record['stage']} run, "
                                "not a finished reward model (rlhf align rm)")
        recorded = record["config"].get("model") or {}
        model_cfg = ModelConfig(name_or_path=str(run_dir), revision=recorded.get("revision"),
                                trust_remote_code=bool(recorded.get("trust_remote_code", False)))
        tokenizer = load_tokenizer(model_cfg)
        model = load_sequence_classifier(model_cfg, tokenizer)
    except ConfigError as e:
        raise FeedbackError(f"suggestions.reward_run: {e}") from None
    texts = [_conversation(item.prompt, c, bool(tokenizer.chat_template)) for item in items for c in item.candidates]
    flat = score(model, tokenizer, texts, batch_size=cfg.batch_size)
    ends = list(itertools.accumulate(len(item.candidates) for item in items))
    return [flat[end - len(item.candidates):end] for item, end in zip(items, ends)]


def _conversation(prompt: str | list[dict], candidate: str, chat: bool) -> str | list[dict]:
    """What the reward model reads: prompt + response as ``pair_metrics`` builds it. A string prompt becomes one user
    turn for a chat model (the stages train on conversational pairs), else the two texts are joined."""
    reply = [{"role": "assistant", "content": candidate}]
    if isinstance(prompt, list):
        return prompt + reply
    return [{"role": "user", "content": prompt}] + reply if chat else prompt + candidate


def ranking_suggestion(scores: list[float], question_id: str, agent: str) -> dict:
    """A ranking suggestion for the REST API: responses best-first with explicit ranks (equal scores share a rank)
    and, as each one's score, its Plackett-Luce probability of being the best of the k, softmax(rewards): Argilla
    wants scores in 0..1, and this is what a Bradley-Terry reward model's outputs mean (Plackett 1975)."""
    weights = [math.exp(s - max(scores)) for s in scores]
    probs = [w / sum(weights) for w in weights]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return {"question_id": question_id, "type": "model", "agent": agent,
            "value": [{"value": response_field(i + 1), "rank": 1 + sum(s > scores[i] for s in scores)}
                      for i in order],
            "score": [round(probs[i], 6) for i in order]}


def default_agent(run_dir: Path) -> str:
    """The run folder's name, with characters Argilla refuses in an agent replaced."""
    name = re.sub(r"[^a-zA-Z0-9\-_:./\s]", "-", run_dir.resolve().name)[:200]
    return name if AGENT_RE.match(name) else "reward-model"


def suggest(cfg: PushConfig, items: dict[str, Item]) -> tuple[str, dict[str, list[float]]]:
    """``(agent, {record id: candidate scores})``."""
    run_dir = cfg.resolve(cfg.suggestions.reward_run)
    scores = reward_scores(cfg.suggestions, run_dir, list(items.values()))
    return cfg.suggestions.agent or default_agent(run_dir), dict(zip(items, scores))


def put_suggestions(client: "rg.Argilla", ds: "rg.Dataset", pairs: list[tuple[str, dict]], batch: int) -> None:
    """Ranking suggestions with their ranks, through the bulk upsert the SDK uses: items matched by external id and
    carrying no fields or metadata leave the record as it is, only its suggestion is replaced."""
    rest = Rest(client)
    for start in range(0, len(pairs), batch):
        rest.put(f"/api/v1/datasets/{ds.id}/records/bulk",
                 json={"items": [{"external_id": rid, "suggestions": [s]} for rid, s in pairs[start:start + batch]]})
