"""What a ranking dataset looks like in Argilla: one place for field, question and metadata names.

A record = one prompt and its K candidate responses. Annotators rank ``response_1..K`` (rank 1 = best, equal ranks
allowed = a tie), may rate the best response (optional RatingQuestion) and may write a corrected answer (optional
TextQuestion). Push, pull, the simulated annotators and the browser test all build on these names.

Record ids are stable (``record_id``): the same prompt with the same candidates always maps to the same Argilla
``external_id``, so pushing again updates instead of duplicating, and pull can join rankings back to the candidates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from curation.records import stable_id

if TYPE_CHECKING:
    import argilla as rg

PROMPT = "prompt"
RANKING = "ranking"
RATING = "rating"
CORRECTION = "correction"
METADATA = ("source", "model", "run")  # terms metadata every pushed record carries (filters in the UI)
# Extra (non-filterable) metadata, so pull can rebuild exact TRL records: the prompt as JSON (chat messages survive
# the Markdown rendering) and the id of the ranking record it came from (lineage back to generate/curate).
PROMPT_JSON = "prompt_json"
SOURCE_ID = "source_id"


def response_field(i: int) -> str:
    """Name of the i-th candidate's field, 1-based (Argilla shows these names as the ranking's options)."""
    return f"response_{i}"


def record_id(prompt: Any, candidates: list[str]) -> str:
    """Stable id of one ranking item: the prompt (string or messages) and its candidate texts, in order."""
    # JSON with sorted keys, not repr(): a prompt read back from Parquet may list message keys in another order
    return "rk-" + stable_id(json.dumps(prompt, sort_keys=True, ensure_ascii=False), *candidates)


def render_prompt(prompt: Any) -> str:
    """A prompt as Markdown for the UI: a plain string as is; chat messages as one bold-role paragraph per turn."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"**{m['role']}**: {m['content']}" for m in prompt)


@dataclass
class DatasetSpec:
    """The ``dataset:`` section of a feedback recipe: how the Argilla dataset is laid out."""

    name: str  # Argilla dataset name
    k: int = 2  # candidates per prompt (fields response_1..k)
    rating: bool = False  # add a 1-5 RatingQuestion "rating" on the best response (optional to answer)
    correction: bool = False  # add a TextQuestion "correction" for a better answer (optional to answer)
    guidelines: Optional[str] = None  # path to a Markdown file shown to annotators (resolved against the recipe)
    min_submitted: int = 1  # overlap: annotators who must submit each record before it counts as completed
    extra_metadata: list[str] = field(default_factory=list)  # more terms metadata names copied from record meta

    def __post_init__(self) -> None:
        if not self.name or not str(self.name).strip():
            raise ValueError("name: must not be empty")
        if not 2 <= self.k <= 20:
            raise ValueError(f"k: a ranking needs 2..20 candidates, got {self.k}")
        if self.min_submitted < 1:
            raise ValueError(f"min_submitted: must be >= 1, got {self.min_submitted}")


def build_settings(spec: DatasetSpec, guidelines_text: Optional[str] = None,
                   client: Optional["rg.Argilla"] = None) -> "rg.Settings":
    """Argilla settings for ``spec``: prompt + response fields (Markdown), the ranking question, optional rating
    and correction questions, terms metadata and overlap via ``TaskDistribution(min_submitted)``.

    Pass the ``client`` the settings are for: without one, every field and question builds the SDK's default client
    from ARGILLA_API_URL/ARGILLA_API_KEY, which fails ("Missing api_key") when the key came from a recipe or the
    embedded server instead."""
    import argilla as rg

    responses = [response_field(i) for i in range(1, spec.k + 1)]
    questions: list = [rg.RankingQuestion(
        name=RANKING, values={r: f"Response {r.rsplit('_', 1)[1]}" for r in responses},
        title="Rank the responses from best (1) to worst", required=True, client=client)]
    if spec.rating:
        questions.append(rg.RatingQuestion(name=RATING, values=[1, 2, 3, 4, 5], required=False,
                                           title="How good is the best response? (1-5)", client=client))
    if spec.correction:
        questions.append(rg.TextQuestion(name=CORRECTION, required=False, use_markdown=True,
                                         title="Optional: a corrected, better answer", client=client))
    return rg.Settings(
        fields=[rg.TextField(name=PROMPT, title="Prompt", use_markdown=True, client=client),
                *(rg.TextField(name=r, title=f"Response {i}", use_markdown=True, client=client)
                  for i, r in enumerate(responses, start=1))],
        questions=questions,
        metadata=[rg.TermsMetadataProperty(name=m, client=client) for m in (*METADATA, *spec.extra_metadata)],
        guidelines=guidelines_text,
        distribution=rg.TaskDistribution(min_submitted=spec.min_submitted),
        allow_extra_metadata=True,  # PROMPT_JSON and SOURCE_ID
    )
