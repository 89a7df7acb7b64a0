"""``rlhf feedback simulate``: scripted annotators rank a pushed dataset through the real Argilla API (issue 6).

For demos and CI, where nobody sits at the web UI: N annotator users follow a scripted preference with some noise,
so ``rlhf feedback pull`` and the agreement report see real responses and give real numbers. Nothing is faked on
the server side: each simulated annotator is an ordinary Argilla annotator (``feedback.annotators.add_annotator``),
takes the next record of *their own* queue the way the UI does (the ``/me/`` search for records pending for them
and not yet completed, so the dataset's ``TaskDistribution(min_submitted)`` decides who answers what), and submits
the raw ranking over REST (the SDK drops ranks, argilla-io/argilla#5712, field-notes trap 11).

Marked as simulation: a response cannot carry metadata, so the mark is the username. Every simulated annotator is
called ``sim-...`` (:func:`is_simulated`), the summary says ``"simulated": true``, and pull can tell simulated
rankings from human ones by name. A re-run only answers what is still pending for each simulated user: it adds
nothing to a dataset they already finished.

Preferences (``preference:``):
* ``reference``: closeness to the reference answer of the record's prompt, as token-set Jaccard similarity
  (|A & B| / |A | B| over lower-cased words); references are the assistant replies of curated instruction
  conversations (or prompt/completion rows), matched by the prompt grouping key ``rlhf curate`` uses.
* ``length``: more words rank higher, the crude stand-in for thoroughness that human raters are known to reward
  ("A Long Way to Go: Investigating Length Correlations in RLHF", Singhal et al. 2023).
* ``keyword:<w1>,<w2>``: more of the listed words present rank higher.
Equal scores are equal ranks (a tie, which pull never turns into a pair).

Noise: with probability ``level`` an annotator's ranking gets two neighbouring rank levels swapped: the mistake
people make is confusing close answers, rarely ranking the worst first. One ``noise`` value is spread over the
annotators (levels from noise/2 to 3*noise/2, mean = noise) so they differ in care, as real teams do, and the
agreement report shows a spread. Each ranking draws from its own generator seeded by (seed, username, record id):
the same run gives the same rankings whatever order the server hands out records in.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedback.client import ArgillaConfig, FeedbackError, Rest

SIM_PREFIX = "sim-"  # every simulated annotator's username starts with it: the "simulation" label pull can read
FALLBACK_SKIP = "skip"
_QUEUE_MAX = 1000  # the largest page the records search serves (argilla_server's LIST_DATASET_RECORDS_LIMIT_LE)


def is_simulated(username: str) -> bool:
    """Whether ``username`` names a simulated annotator (see the module docstring)."""
    return username.startswith(SIM_PREFIX)


# ---------------------------------------------------------------------------------------------------- the recipe
@dataclass
class SimulateConfig:
    """A ``feedback simulate`` recipe (samples/telecom/simulate.yaml)."""

    dataset: str  # the Argilla ranking dataset (in argilla.workspace), pushed with `rlhf feedback push`
    argilla: ArgillaConfig = field(default_factory=ArgillaConfig)  # server, owner key (creates the users), workspace
    annotators: int | list[str] = 3  # how many (sim-annotator-1..N) or their usernames, each starting with "sim-"
    preference: str = "reference"  # reference | length | keyword:<w1>,<w2>: what the simulated annotators prefer
    references: str | list[str] = field(default_factory=list)  # for "reference": curated folders or JSONL/Parquet files
    fallback: str = "length"  # rule for a record without a reference: length | keyword:<words> | skip
    noise: float | list[float] = 0.2  # chance a ranking is perturbed: one value spread over annotators, or one each
    seed: int = 0  # the same seed gives the same rankings
    max_records: int | None = None  # most records each annotator answers in this run; None: all still pending

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ValueError("dataset: must be a non-empty string")
        if isinstance(self.argilla, dict):
            self.argilla = ArgillaConfig(**self.argilla)
        names = self.usernames()
        if len(set(names)) != len(names):
            raise ValueError(f"annotators: usernames must be distinct, got {names}")
        parse_rule(self.preference, "preference", allow=("reference",))
        if self.fallback != FALLBACK_SKIP:
            parse_rule(self.fallback, "fallback")
        if isinstance(self.references, str):
            self.references = [self.references]
        if self.preference == "reference" and not self.references:
            raise ValueError("references: preference 'reference' needs reference answers (a curated folder or files)")
        self.noise_levels()  # validates noise
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an integer, got {self.seed!r}")
        if self.max_records is not None and (isinstance(self.max_records, bool) or not isinstance(self.max_records, int)
                                             or self.max_records < 1):
            raise ValueError(f"max_records: expected an integer >= 1 or null, got {self.max_records!r}")

    def usernames(self) -> list[str]:
        """The simulated annotators' usernames, in order."""
        if isinstance(self.annotators, int) and not isinstance(self.annotators, bool):
            if not 1 <= self.annotators <= 100:
                raise ValueError(f"annotators: expected 1..100 annotators, got {self.annotators}")
            return [f"{SIM_PREFIX}annotator-{i}" for i in range(1, self.annotators + 1)]
        if not isinstance(self.annotators, list) or not self.annotators \
                or not all(isinstance(n, str) and is_simulated(n) for n in self.annotators):
            raise ValueError(f"annotators: expected a count or usernames starting with {SIM_PREFIX!r} (the mark of a "
                             f"simulated annotator), got {self.annotators!r}")
        return list(self.annotators)

    def noise_levels(self) -> list[float]:
        """Each annotator's perturbation probability, in :meth:`usernames` order."""
        n = len(self.usernames())
        values = self.noise if isinstance(self.noise, list) else [self.noise]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in values):
            raise ValueError(f"noise: expected probabilities in [0, 1], got {self.noise!r}")
        if isinstance(self.noise, list):
            if len(values) != n:
                raise ValueError(f"noise: a list needs one value per annotator ({n}), got {len(values)}")
            return [float(v) for v in values]
        if n == 1:
            return [float(self.noise)]
        return [min(1.0, self.noise * (0.5 + i / (n - 1))) for i in range(n)]  # noise/2 .. 3*noise/2


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SimulateConfig:
    """The simulate recipe at ``path`` with ``--set key=value`` overrides; errors (``ConfigError``) name file and key.
    Relative reference paths stay relative to the working directory, as in generate/push/pull."""
    from rlhf.config import load_config as load

    return load(SimulateConfig, path, overrides)


# ----------------------------------------------------------------------------------------------- the preference
def parse_rule(text: str, name: str, allow: tuple[str, ...] = ()) -> tuple[str, frozenset[str]]:
    """``(kind, keywords)`` of a rule ``length`` | ``keyword:<w1>,<w2>`` (| ``allow``); ValueError naming ``name``."""
    kind, _, words = str(text).partition(":")
    keywords = frozenset(w.strip().lower() for w in words.split(",") if w.strip())
    if kind == "keyword" and keywords:
        return kind, keywords
    if kind in ("length", *allow) and not words:
        return kind, frozenset()
    raise ValueError(f"{name}: expected {' | '.join((*allow, 'length', 'keyword:<w1>,<w2>'))}, got {text!r}")


def _tokens(text: str) -> set[str]:
    from curation.records import words

    return set(words(text.lower()))


def jaccard(a: str, b: str) -> float:
    """Token-set Jaccard similarity of two texts (1.0 for two texts without words: nothing tells them apart)."""
    ta, tb = _tokens(a), _tokens(b)
    return len(ta & tb) / len(ta | tb) if ta | tb else 1.0


def score(rule: tuple[str, frozenset[str]], text: str, reference: str | None = None) -> float:
    """How much a scripted annotator likes ``text`` under ``rule`` (higher is better)."""
    kind, keywords = rule
    if kind == "reference":
        return jaccard(text, reference or "")
    if kind == "keyword":
        return float(len(keywords & _tokens(text)))
    from curation.records import words

    return float(len(words(text)))


def ideal_ranks(scores: dict[str, float]) -> dict[str, int]:
    """``{candidate: rank}``: 1 for the highest score, equal scores share a rank (dense ranking, like the UI's)."""
    levels = sorted({round(s, 9) for s in scores.values()}, reverse=True)  # rounding: float noise is not a preference
    return {c: levels.index(round(s, 9)) + 1 for c, s in scores.items()}


def perturb(ranks: dict[str, int], level: float, rng: random.Random) -> dict[str, int]:
    """With probability ``level``, swap two neighbouring rank levels chosen at random (see the module docstring)."""
    top = max(ranks.values())
    if top < 2 or rng.random() >= level:
        return ranks
    r = rng.randint(1, top - 1)  # swap levels r and r + 1
    return {c: r + 1 if k == r else r if k == r + 1 else k for c, k in ranks.items()}


# ------------------------------------------------------------------------------------------------ the references
def prompt_key(prompt: Any) -> str:
    """The key a prompt's reference is found under: its turns without system prompts, normalised (the grouping
    key of ``rlhf curate`` and ``feedback generate``, so generated prompts find their curated reply)."""
    from curation.records import normalize, prompt_text

    return normalize(prompt_text({"prompt": prompt}))


def _reference_row(row: dict) -> tuple[str, str] | None:
    """``(prompt key, reference)`` of an instruction row (``messages``: the last assistant reply) or a
    prompt-completion row; None for other rows."""
    messages, completion = row.get("messages"), row.get("completion")
    if isinstance(messages, list):
        end = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if end is None:
            return None
        return prompt_key(messages[:end]), messages[end]["content"]
    if row.get("prompt") is not None and completion is not None:
        if isinstance(completion, list):  # conversational prompt-completion: [{"role": "assistant", ...}]
            completion = "\n".join(m["content"] for m in completion)
        return prompt_key(row["prompt"]), str(completion)
    return None


def load_references(paths: list[str]) -> dict[str, str]:
    """``{prompt key: reference answer}`` from curated folders (their instruction and prompt_completion sets, train
    and test) or files; the first reply wins when a prompt has several."""
    from feedback.prompts import read_rows, split_source

    sources: list[Path] = []
    for item in paths:
        path = Path(item).expanduser()
        if not path.exists():
            raise FeedbackError(f"references: not found: {path}")
        roots = [path / k for k in ("instruction", "prompt_completion") if (path / k).is_dir()] \
            if (path / "curation.json").is_file() else [path]
        for root in roots:
            for split in ("train", "test"):
                try:
                    sources.append(split_source(root, split))
                except FeedbackError:
                    continue  # a folder without this split
                if root.is_file():
                    break
    refs: dict[str, str] = {}
    for source in sources:
        for _, row in read_rows(source):
            pair = _reference_row(row)
            if pair:
                refs.setdefault(*pair)
    if not refs:
        raise FeedbackError(f"references: no instruction (messages) or prompt/completion rows in {', '.join(paths)}")
    return refs


# ----------------------------------------------------------------------------------------------------- Argilla
class _AsUser(Rest):
    """REST as one annotator. A plain httpx client: every new ``argilla.Argilla`` becomes the SDK's default client,
    and the caller's SDK calls must keep running as the owner."""

    def __init__(self, api_url: str, api_key: str, timeout: int):
        import httpx

        self.http = httpx.Client(base_url=api_url, headers={"X-Argilla-Api-Key": api_key}, timeout=timeout)


def _annotator(client, name: str, cfg: SimulateConfig) -> _AsUser:
    """The simulated user ``name``, created or reused as an annotator of the workspace, as a REST session. The key
    comes from GET /users/{id} as the owner; a password add_annotator generates goes to its 0600 file only."""
    from feedback.annotators import add_annotator, user_api_key

    home = Path(cfg.argilla.home) if cfg.argilla.home else None
    user, _ = add_annotator(client, name, cfg.argilla.workspace, home=home)
    return _AsUser(client.api_url, user_api_key(client, user.id), cfg.argilla.timeout)


def _next_pending(rest: Rest, dataset_id: str, passed: set[str]) -> str | None:
    """The first record of this user's queue they have not passed on: what the web UI shows next (pending for
    them, not yet completed by the dataset's TaskDistribution)."""
    body = {"filters": {"and": [
        {"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": ["pending"]},
        {"type": "terms", "scope": {"entity": "record", "property": "status"}, "values": ["pending"]}]}}
    page = rest.post(f"/api/v1/me/datasets/{dataset_id}/records/search", body,
                     limit=min(len(passed) + 1, _QUEUE_MAX))  # one more than passed: holds a new one if any
    return next((it["record"]["id"] for it in page["items"] if it["record"]["id"] not in passed), None)


def _ranking(rec, cfg: SimulateConfig, refs: dict[str, str], name: str, level: float) -> dict[str, int] | None:
    """The ranking ``name`` gives ``rec``; None when the record is skipped (no reference and fallback skip)."""
    reference = refs.get(prompt_key(rec.prompt)) if rec.prompt else None
    rule_text = cfg.preference if cfg.preference != "reference" or reference is not None else cfg.fallback
    if rule_text == FALLBACK_SKIP:
        return None
    rule = parse_rule(rule_text, "preference", allow=("reference",))
    ranks = ideal_ranks({f: score(rule, text, reference) for f, text in rec.candidates.items()})
    # str seeds hash with SHA-512 in random.seed: stable across processes, unlike hash()
    return perturb(ranks, level, random.Random(f"{cfg.seed}:{name}:{rec.external_id}"))


def run(cfg: SimulateConfig, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Let every simulated annotator rank what is pending for them; returns a summary (no secrets in it)."""
    from feedback.client import connect
    from feedback.dataset import RANKING
    from feedback.pull import fetch_records, find_dataset

    refs = load_references(cfg.references) if cfg.preference == "reference" else {}
    client = connect(cfg.argilla)
    ds = find_dataset(client, cfg.dataset, cfg.argilla.workspace)
    records = {r.uuid: r for r in fetch_records(client, ds)}
    names, levels = cfg.usernames(), cfg.noise_levels()
    sessions = {name: _annotator(client, name, cfg) for name in names}
    submitted: Counter = Counter()
    skipped: dict[str, str] = {}  # record uuid -> reason
    passed: dict[str, set[str]] = {name: set() for name in names}
    active = list(names)
    try:
        while active:  # round robin, one record each, so min_submitted spreads the work as parallel people would
            for name, level in [(n, levels[names.index(n)]) for n in active]:
                uuid = None if submitted[name] == cfg.max_records else \
                    _next_pending(sessions[name], str(ds.id), passed[name])
                if uuid is None:
                    active.remove(name)
                    continue
                rec = records.get(uuid)  # None: pushed after this run listed the dataset
                ranks = _ranking(rec, cfg, refs, name, level) if rec and len(rec.candidates) >= 2 else None
                if ranks is None:  # left pending for people (or a later run), counted once per record
                    skipped[uuid] = "added_during_run" if rec is None else "fewer_than_2_candidates" \
                        if len(rec.candidates) < 2 else "no_reference"
                    passed[name].add(uuid)
                    continue
                sessions[name].post(f"/api/v1/records/{uuid}/responses", {"status": "submitted", "values": {
                    RANKING: {"value": [{"value": f, "rank": k} for f, k in ranks.items()]}}})
                submitted[name] += 1
    finally:
        for rest in sessions.values():
            rest.http.close()
    summary = {"simulated": True, "dataset": f"{cfg.argilla.workspace}/{cfg.dataset}",
               "annotators": {n: {"noise": round(lv, 4), "submitted": submitted[n]} for n, lv in zip(names, levels)},
               "submitted": sum(submitted.values()), "skipped": dict(Counter(skipped.values())),
               "preference": cfg.preference, "fallback": cfg.fallback, "references": len(refs), "noise": cfg.noise,
               "seed": cfg.seed}
    log(f"SIMULATION: {len(names)} scripted annotators ({', '.join(names)}) submitted {summary['submitted']} "
        f"rankings to {summary['dataset']} (preference {cfg.preference}, noise {cfg.noise}, seed {cfg.seed})")
    return summary
