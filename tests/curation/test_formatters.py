"""Formatting steps: every row they emit must be a row TRL reads (checked with TRL's own helpers)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast
from trl.data_utils import is_conversational, maybe_apply_chat_template

from curation.formatters import FormatInstructions, RankedToPairs, RatingsToPairs, Split
from curation.pipeline import Pipeline
from curation.records import message, new_record, normalize
from curation.steps import CurationError, InputError, Reader

OURS = {"id", "source", "lineage", "meta"}
TRL_KEYS = {
    "messages": {"messages"},
    "prompt_completion": {"prompt", "completion"},
    "text_prompt_completion": {"prompt", "completion"},
    "preference": {"prompt", "chosen", "rejected"},
}

# A tokenizer built in memory (no download) with a minimal chat template, so TRL can render our rows for real.
TOKENIZER = PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
    chat_template="{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
                  "{% if add_generation_prompt %}<assistant>{% endif %}",
)


def assert_trl_row(row: dict, kind: str, extra: set = frozenset()) -> None:
    """Exactly TRL's keys for ``kind`` plus ours, TRL recognises the format, and TRL's chat templating accepts it."""
    assert set(row) == TRL_KEYS[kind] | OURS | set(extra), sorted(row)
    if kind == "text_prompt_completion":
        assert not is_conversational(row)
        assert isinstance(row["prompt"], str) and isinstance(row["completion"], str)
        return
    assert is_conversational(row)
    if kind == "preference":
        assert row["prompt"][-1]["role"] == "user"
        for side in ("chosen", "rejected"):
            assert len(row[side]) == 1 and row[side][0]["role"] == "assistant"
    if kind == "prompt_completion":
        assert len(row["completion"]) == 1 and row["completion"][0]["role"] == "assistant"
    rendered = maybe_apply_chat_template(row, TOKENIZER)
    assert all(isinstance(v, str) for v in rendered.values())


def run(step, records):
    """The step's output and the (reason, record id) pairs it dropped."""
    dropped = []
    step._sink = lambda record, label, reason: dropped.append((reason, record.get("id")))
    return list(step.run(records)), dropped


def chat(row, *turns, **fields):
    """A conversation record; ``turns`` alternate user/assistant starting with user unless given as (role, text)."""
    messages = [message(*t) if isinstance(t, tuple) else message("user" if i % 2 == 0 else "assistant", t)
                for i, t in enumerate(turns)]
    return new_record("chats", "chats.jsonl", row, messages=messages, meta={"lang": "en"}, **fields)


def ranking(ranks=None, scores=None, prompt="Which plan is cheapest?"):
    contents = ["A", "B", "C", "D"][: len(ranks or scores)]
    ranks = ranks or [None] * len(contents)
    scores = scores or [None] * len(contents)
    candidates = [{"content": c, "rank": r, "score": s} for c, r, s in zip(contents, ranks, scores)]
    return new_record("rank", "ranks.jsonl", 1, prompt=prompt, candidates=candidates, meta={})


def pairs_of(rows):
    return [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]


# --------------------------------------------------------------------------------------------- format_instructions


def test_messages_style_trims_trailing_user_turns_and_adds_system_prompt():
    step = FormatInstructions(system_prompt="You are a telecom support agent.")
    has_system = chat(2, ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"))
    out, dropped = run(step, [chat(1, "My bill is wrong", "Let me check.", "Thanks", score=4), has_system])
    assert dropped == []
    assert out[0]["messages"] == [message("system", "You are a telecom support agent."),
                                  message("user", "My bill is wrong"), message("assistant", "Let me check.")]
    assert out[0]["score"] == 4 and out[0]["meta"] == {"lang": "en"}
    assert out[1]["messages"] == has_system["messages"]  # its own system prompt is kept, not doubled
    assert step.counters["trailing_user_turns_trimmed"] == 1 and step.counters["system_prompt_added"] == 1
    assert_trl_row(out[0], "messages", {"score"})
    assert_trl_row(out[1], "messages")


def test_prompt_completion_style_splits_before_the_final_assistant_turn():
    record = chat(1, "Is 5G available?", "Yes, in most cities.", "In Lyon?", "Yes.")
    out, _ = run(FormatInstructions(style="prompt_completion", system_prompt="Be kind."), [record])
    assert out[0]["prompt"] == [message("system", "Be kind."), *record["messages"][:3]]
    assert out[0]["completion"] == [message("assistant", "Yes.")]
    assert out[0]["id"] == record["id"] and out[0]["lineage"] == record["lineage"]
    assert_trl_row(out[0], "prompt_completion")


def test_text_style_keeps_single_turns_and_drops_what_plain_strings_cannot_hold():
    single = chat(1, "Reset my router?", "Hold the button for 10 s.", "ok")  # trailing user turn: still single
    multi = chat(2, "Hi", "Hello", "Roaming?", "Enabled.")
    system = chat(3, ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"))
    unanswered = chat(4, "Anyone there?")
    no_user = chat(5, ("system", "Greeting"), ("assistant", "Welcome!"))
    step = FormatInstructions(style="text_prompt_completion")
    out, dropped = run(step, [single, multi, system, unanswered, no_user])
    assert [(r["prompt"], r["completion"]) for r in out] == [("Reset my router?", "Hold the button for 10 s.")]
    assert dropped == [("multi_turn", multi["id"]), ("system_turn", system["id"]),
                       ("no_assistant_turn", unanswered["id"]), ("no_user_turn", no_user["id"])]
    assert_trl_row(out[0], "text_prompt_completion")


def test_other_kinds_pass_through_unchanged():
    doc = new_record("docs", "faq.html", 1, text="Our plans")
    pref = new_record("p", "p.jsonl", 1, prompt=[message("user", "q")], chosen=[message("assistant", "a")],
                      rejected=[message("assistant", "b")])
    out, dropped = run(FormatInstructions(style="prompt_completion"), [doc, pref, ranking(ranks=[1, 2])])
    assert out == [doc, pref, ranking(ranks=[1, 2])] and dropped == []


def test_bad_format_options_are_refused_at_construction():
    with pytest.raises(CurationError, match="system_prompt"):
        FormatInstructions(style="text_prompt_completion", system_prompt="Be kind.")
    with pytest.raises(CurationError, match="style.*'sharegpt'"):
        FormatInstructions(style="sharegpt")


# --------------------------------------------------------------------------------------------- ranked_to_pairs


@pytest.mark.parametrize("ranks, strategy, expected, ties", [
    # k=4 with B and C tied: 4*3/2 = 6 pairs minus the tie = 5
    ([1, 2, 2, 3], "all_pairs", [("A", "B"), ("A", "C"), ("A", "D"), ("B", "D"), ("C", "D")], 1),
    ([1, 2, 2, 3], "best_vs_rest", [("A", "B"), ("A", "C"), ("A", "D")], 0),
    ([1, 2, 2, 3], "best_vs_worst", [("A", "D")], 0),
    # k=3 with A and B tied for best: each top one beats C; best_vs_worst takes the first top one
    ([1, 1, 2], "all_pairs", [("A", "C"), ("B", "C")], 1),
    ([1, 1, 2], "best_vs_rest", [("A", "C"), ("B", "C")], 1),
    ([1, 1, 2], "best_vs_worst", [("A", "C")], 0),
    # ranks need not come sorted: D is best, A worst
    ([3, 2, 2, 1], "best_vs_worst", [("D", "A")], 0),
])
def test_ranked_pairs_by_strategy(ranks, strategy, expected, ties):
    step = RankedToPairs(strategy=strategy)
    parent = ranking(ranks=ranks)
    out, dropped = run(step, [parent])
    assert sorted(pairs_of(out)) == sorted(expected) and dropped == []
    assert step.counters["tie_pairs_skipped"] == ties and step.counters["pairs"] == len(expected)
    assert len({r["id"] for r in out}) == len(out)
    for row in out:
        assert_trl_row(row, "preference")
        assert row["prompt"] == [message("user", "Which plan is cheapest?")]
        assert row["lineage"]["parent"] == parent["id"]
        chosen, rejected = "ABCD".index(row["chosen"][0]["content"]), "ABCD".index(row["rejected"][0]["content"])
        assert (row["meta"]["chosen_rank"], row["meta"]["rejected_rank"]) == (ranks[chosen], ranks[rejected])


def test_scores_rank_candidates_when_ranks_are_missing():
    out, _ = run(RankedToPairs(), [ranking(scores=[0.2, 0.9, 0.5])])
    assert sorted(pairs_of(out)) == [("B", "A"), ("B", "C"), ("C", "A")]
    b_over_a = next(r for r in out if pairs_of([r]) == [("B", "A")])
    assert b_over_a["meta"] == {"chosen_rank": 1, "rejected_rank": 3, "chosen_score": 0.9, "rejected_score": 0.2}


def test_rankings_without_pairs_are_dropped_and_other_records_pass():
    tied, single, unranked = ranking(ranks=[2, 2, 2]), ranking(ranks=[1]), ranking(ranks=[1, 2])
    unranked["candidates"][1]["rank"] = None
    chat_row = chat(1, "q", "a")
    for strategy in ("all_pairs", "best_vs_rest", "best_vs_worst"):
        out, dropped = run(RankedToPairs(strategy=strategy), [tied, single, unranked, chat_row])
        assert out == [chat_row]
        assert [reason for reason, _ in dropped] == ["no_pairs", "no_pairs", "unranked_candidates"]


def test_a_rank_that_is_not_a_number_names_the_row():
    bad = ranking(ranks=[1, "second"])
    with pytest.raises(InputError, match=r"ranks.jsonl:1: candidates.rank: expected a number, got 'second'"):
        run(RankedToPairs(), [bad])


# --------------------------------------------------------------------------------------------- ratings_to_pairs


def rated_chats():
    return [
        chat(1, "My internet is DOWN!", "Did you restart the router?", score=5),
        chat(2, "Roaming prices?", "2 EUR/day.", score=4),
        chat(3, "my internet is down", "Please wait.", score=4),  # same prompt once normalised
        chat(4, "My internet is down.", "Not our problem.", score=1),
        chat(5, "My internet is down", "no score: passes untouched"),
    ]


def test_rated_conversations_pair_above_the_margin():
    records = rated_chats()
    step = RatingsToPairs(margin=2)
    out, dropped = run(step, records)
    assert out[:5] == records and dropped == []  # sources first, pairs at the end of the stream
    pairs = out[5:]
    # scores 5, 4, 1 on one prompt: 5-1 and 4-1 reach the margin of 2, 5-4 does not; largest margin first
    assert pairs_of(pairs) == [("Did you restart the router?", "Not our problem."), ("Please wait.", "Not our problem.")]
    assert all(p["prompt"] == [message("user", "My internet is DOWN!")] for p in pairs)  # the first record's prompt
    assert pairs[0]["lineage"]["parent"] == records[0]["id"]
    assert pairs[0]["meta"] == {"lang": "en", "chosen_score": 5, "rejected_score": 1, "rejected_id": records[3]["id"]}
    assert dict(step.counters) == {"groups": 2, "pairs": 2, "pairs_below_margin": 1}
    for p in pairs:
        assert_trl_row(p, "preference")


def test_default_margin_pairs_a_one_point_gap_and_the_cap_keeps_the_largest_margins():
    out, _ = run(RatingsToPairs(), rated_chats())
    assert len(out) == 5 + 3
    step = RatingsToPairs(max_pairs_per_prompt=1)
    out, _ = run(step, rated_chats())
    assert pairs_of(out[5:]) == [("Did you restart the router?", "Not our problem.")]
    assert step.counters["pairs_capped"] == 2


def test_multi_turn_prompts_group_on_every_turn_before_the_reply():
    a = chat(1, "Hi", "Hello, how can I help?", "Cancel my plan", "Done.", score=5)
    b = chat(2, "Hi", "Hello, how can I help?", "Cancel my plan", "Call us.", score=2)
    c = chat(3, "Hi", "Hello, how can I help?", "Upgrade my plan", "Upgraded.", score=1)
    out, _ = run(RatingsToPairs(), [a, b, c])
    assert pairs_of(out[3:]) == [("Done.", "Call us.")]
    assert out[3]["prompt"] == a["messages"][:3]
    assert_trl_row(out[3], "preference")


def test_without_emit_source_every_rated_record_is_paired_or_dropped():
    records = rated_chats() + [chat(6, "Same text?", "Yes.", score=5), chat(7, "Same text?", "Yes.", score=1)]
    step = RatingsToPairs(margin=2, emit_source=False)
    out, dropped = run(step, records)
    assert out[0] == records[4] and len(out) == 1 + 2  # the unscored chat, then the two pairs
    assert sorted(dropped) == sorted([("no_pairs", records[1]["id"]), ("no_pairs", records[5]["id"]),
                                      ("no_pairs", records[6]["id"])])
    assert step.counters["sources_consumed"] == 3 and step.counters["identical_pairs_skipped"] == 1


@pytest.mark.parametrize("options, field", [({"margin": 0}, "margin"), ({"max_pairs_per_prompt": 0}, "max_pairs"),
                                            ({"emit_source": "yes"}, "emit_source")])
def test_bad_ratings_options_are_refused(options, field):
    with pytest.raises(CurationError, match=field):
        RatingsToPairs(**options)


# --------------------------------------------------------------------------------------------- split


def many_records(n_prompts=200):
    """Each prompt three times: as a chat, as a (system-prompted) SFT row and as a preference row."""
    records = []
    for i in range(n_prompts):
        question = f"Question number {i} about my plan?"
        records.append(chat(i, question, f"Answer {i}."))
        records.append(chat(i + 10_000, ("system", "You are a support agent."), ("user", question.upper()),
                            ("assistant", "Other answer.")))
        records.append(new_record("p", "p.jsonl", i, prompt=[message("user", question)],
                                  chosen=[message("assistant", "a")], rejected=[message("assistant", "b")]))
    return records


def split_by_prompt(step, records):
    out, _ = run(step, records)
    by_prompt: dict[str, set] = {}
    for row in out:
        question = next(m["content"] for m in row.get("messages") or row["prompt"] if m["role"] == "user")
        by_prompt.setdefault(normalize(question), set()).add(row["split"])
    return out, by_prompt


def test_split_keeps_each_prompt_on_one_side_and_is_deterministic():
    records = many_records()
    step = Split(test_size=0.2, split_seed=7)
    out, by_prompt = split_by_prompt(step, records)
    assert len(by_prompt) == 200 and all(len(sides) == 1 for sides in by_prompt.values())
    n_test = sum(sides == {"test"} for sides in by_prompt.values())
    assert 20 <= n_test <= 60  # about 20% of 200 prompts; a fixed seed makes this exact run repeatable
    assert step.counters["test"] == 3 * n_test and step.counters["train"] == 3 * (200 - n_test)
    assert [r["split"] for r in run(Split(test_size=0.2, split_seed=7), records)[0]] == [r["split"] for r in out]
    other, _ = run(Split(test_size=0.2, split_seed=8), records)
    assert [r["split"] for r in other] != [r["split"] for r in out]


def test_split_uses_the_recipe_seed_by_default_and_ignores_a_shared_system_prompt():
    records = [r for r in many_records() if "messages" in r]
    splits = []
    for seed in (1, 2):
        step = Split(test_size=0.3)
        step.seed = seed  # what build_steps sets from the recipe's `seed`
        splits.append([r["split"] for r in run(step, records)[0]])
    assert splits[0] != splits[1]
    system_prompted = [s for r, s in zip(records, splits[0]) if r["messages"][0]["role"] == "system"]
    assert set(system_prompted) == {"train", "test"}  # grouped by the question, not the common system prompt


@pytest.mark.parametrize("options", [{"test_size": 0}, {"test_size": 1.5}, {"split_seed": "abc"}])
def test_bad_split_options_are_refused(options):
    with pytest.raises(CurationError, match=next(iter(options))):
        Split(**options)


# --------------------------------------------------------------------------------------------- together


class Given(Reader):
    """A reader of records made in the test: the ledger counts what readers create."""

    def __init__(self, records):
        self.records = records

    def read(self):
        yield from self.records


def test_a_formatting_pipeline_reconciles_and_emits_only_trl_rows():
    records = rated_chats() + [chat(9, "Anyone?"), ranking(ranks=[1, 2, 2, 3]), ranking(ranks=[1, 1])]
    steps = [Given(records), RatingsToPairs(), RankedToPairs(), FormatInstructions(style="prompt_completion"),
             Split(split_seed=3)]
    pipeline = Pipeline(steps)
    out = list(pipeline.run())
    pipeline.ledger.check()  # format_instructions and split: in == out + dropped; overall created == kept + dropped
    kinds = {"preference": 0, "prompt_completion": 0}
    for row in out:
        kind = "preference" if "chosen" in row else "prompt_completion"
        kinds[kind] += 1
        assert_trl_row(row, kind, {"split"} | ({"score"} if "score" in row else set()))
    assert kinds == {"preference": 3 + 5, "prompt_completion": 5}
    assert pipeline.ledger.dropped == 2  # the unanswered chat and the all-tied ranking


def test_system_prompt_reaches_preference_prompts_too():
    """SFT rows and preference rows must share the prompt format the policy is served with."""
    step = FormatInstructions(system_prompt="Be brief.")
    pair = {"id": "p", "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    has_system = {**pair, "prompt": [{"role": "system", "content": "Other."}, {"role": "user", "content": "q"}]}
    text_pc = {"id": "t", "prompt": "q", "completion": "a"}
    out = list(step.run([pair, has_system, text_pc]))
    assert out[0]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    assert out[1] == has_system and out[2] == text_pc
    assert step.counters["system_prompt_added"] == 1
