"""Issue 6: one self-contained ``report.html`` per pipeline run: the data funnel, annotator agreement, training curves,
the evaluation table and sample generations.

Stdlib only (no matplotlib, no template engine) so ``rlhf`` stays instant: the plots are inline SVG, the page has no
script and loads nothing from outside, so it opens offline and can be mailed as one file. Every number shown carries
``data-metric`` (its key path in the pipeline's ``run.json``, dot-joined) and ``data-value`` (the exact value as JSON),
every plot ``data-curve="stage.curve"`` and one ``<circle>`` per point: tests/rlhf/report_check.py checks the rendered
page against the record through those hooks.

This module reads the stage outputs (`collect`) and lays out the page's sections (`render`, `write`); the building
blocks (number formatting, hooked number spans, tables, the SVG plot, the style sheet) live in rlhf/report_html.py.
``fmt``, ``plot`` and ``CSS`` are importable from here too, as before the split.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from rlhf.report_html import CSS, DASH, esc, fmt, lookup, num, plot, section, table

REPORT_FILE = "report.html"
STAGE_KEYS = ("curate", "pull", "sft", "rm", "policy", "eval")  # the keys `collect` accepts in `outputs`
TRAINING_STAGES = ("sft", "rm", "policy")
MAX_SAMPLES = 20  # samples kept in `results`: the pipeline stores them in its run.json, which should stay small
# curve -> history.json keys, first present wins: Trainer/TRL names (SFT, RewardTrainer, DPO, GRPO/RLOO) and our PPO's
CURVES = {"loss": ("loss", "loss/policy"), "eval_loss": ("eval_loss",), "reward": ("objective/score", "reward"),
          "margin": ("rewards/margins", "margin"), "kl": ("objective/kl", "kl"),
          "accuracy": ("accuracy", "rewards/accuracies", "mean_token_accuracy"),
          "eval_accuracy": ("eval_accuracy", "eval_rewards/accuracies", "eval_mean_token_accuracy")}
# run.json metrics worth a line in the report (alignment/training.py's log_history_metrics, ppo.py, online.py)
TRAIN_METRICS = ("global_step", "updates", "epoch", "train_rows", "eval_rows", "train_prompts", "train_loss_first",
                 "train_loss_last", "eval_loss", "eval_perplexity", "accuracy", "margin", "eval_accuracy",
                 "rewards/accuracies", "rewards/margins", "eval_rewards/accuracies", "score_first", "score_last",
                 "kl_first", "objective_kl", "eval_score", "eval_score_reference", "train_reward_first",
                 "train_reward_last", "kl", "trainable_params", "trainable_percent")


# ------------------------------------------------------------------------------------------------------- collect
def _read_json(folder: Path, name: str) -> Any:
    """``folder/name`` parsed; None when absent (a stage not run yet)."""
    file = folder / name
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def _clean(v: Any) -> Any:
    """JSON-safe copy: str keys, lists, NaN/Infinity -> None (a NaN loss must not make run.json invalid JSON)."""
    return json.loads(json.dumps(v, default=str), parse_constant=lambda _: None)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _funnel(path: Path) -> dict:
    manifest = _read_json(path, "curation.json")
    if manifest is None:
        return {}
    ledger = manifest.get("ledger") or {}
    steps = ledger.get("steps") or []
    pii: dict[str, int] = {}
    for s in steps:
        for key, n in (s.get("counters") or {}).items():
            if key.startswith("pii:"):
                pii[key[4:]] = pii.get(key[4:], 0) + n
    # dedup steps as curation/card.py counts them: records dropped and clusters (kept records that had duplicates)
    dedup = [s for s in steps if str(s.get("type", "")).endswith("dedup")]
    dropped = {s["step"]: sum((s.get("dropped") or {}).values()) for s in dedup}
    exact = sum(n for s in dedup if s.get("type") == "exact_dedup" for n in (s.get("dropped") or {}).values())
    return {"path": str(path), "name": manifest.get("name"), "wall_time_s": manifest.get("wall_time_s"),
            **{k: ledger.get(k) for k in ("read", "created", "kept", "dropped")},
            "by_step": [{"step": s.get("step"), "type": s.get("type"), "in": s.get("in"), "created": s.get("created"),
                         "kept": s.get("out"), "dropped": sum((s.get("dropped") or {}).values())} for s in steps],
            "drops_by_reason": dict(sorted((ledger.get("drops_by_reason") or {}).items(), key=lambda kv: -kv[1])),
            "pii": dict(sorted(pii.items())),
            "duplicates": {"exact": exact, "near": sum(dropped.values()) - exact, "total": sum(dropped.values()),
                           "clusters": sum((s.get("counters") or {}).get("clusters", 0) for s in dedup)},
            "datasets": _datasets(manifest)}


def _datasets(manifest: dict) -> dict[str, int]:
    return {f"{kind}/{split}": n for kind, out in (manifest.get("outputs") or {}).items()
            for split, n in (out.get("splits") or {}).items()}


def _feedback(path: Path) -> dict:
    manifest = _read_json(path, "curation.json") or {}
    summary = manifest.get("pull") or {}
    agreement = _read_json(path, "agreement.json") or summary  # the pull summary repeats alpha, agreement, counts
    if not manifest and not agreement:
        return {}
    counts = agreement.get("counts") or summary.get("counts") or {}
    simulated = list(agreement.get("simulated_annotators") or summary.get("simulated_annotators") or [])
    return {"path": str(path), "records": counts.get("records_counted", agreement.get("records")),
            "submitted": counts.get("responses_submitted"), "pairs": counts.get("rows"),
            "waiting": counts.get("records_waiting_for_annotators"), "comparisons": agreement.get("comparisons"),
            "records_with_overlap": agreement.get("records_with_overlap"),
            "annotators": agreement.get("annotators") or {}, "pairwise_agreement": agreement.get("pairwise_agreement"),
            "krippendorff_alpha": agreement.get("krippendorff_alpha_ordinal"), "simulated": bool(simulated),
            "simulated_annotators": simulated, "datasets": _datasets(manifest)}


def _curves(history: list) -> tuple[dict, dict]:
    curves, keys = {}, {}
    for name, candidates in CURVES.items():
        key = next((k for k in candidates if any(isinstance(e, dict) and k in e for e in history)), None)
        if key is None:
            continue
        points = [[e.get("step", i + 1), e[key]] for i, e in enumerate(history)
                  if isinstance(e, dict) and _is_num(e.get(key)) and _is_num(e.get("step", i + 1))]
        if points:
            curves[name], keys[name] = points, key
    return curves, keys


def _training(path: Path) -> dict:
    run = _read_json(path, "run.json")
    if run is None:
        return {}
    history = _read_json(path, "history.json") or []
    metrics = run.get("metrics") or {}
    curves, keys = _curves(history if isinstance(history, list) else [])
    return {"path": str(path), "kind": run.get("stage"), "status": run.get("status"),
            "wall_time_s": run.get("wall_time_s"), "metrics": {k: metrics[k] for k in TRAIN_METRICS if k in metrics},
            "curves": curves, "curve_keys": keys}


def _eval(path: Path) -> dict:
    run = _read_json(path, "run.json")
    if run is None:
        return {}
    return {"path": str(path), "status": run.get("status"), "metrics": run.get("metrics") or {},
            "samples": list(run.get("samples") or [])[:MAX_SAMPLES]}


def collect(outputs: dict[str, str | Path | None], annotation: dict | None = None) -> dict:
    """The report's numbers from the stages' output folders (``outputs``: stage key -> path, None = not run);
    JSON-able, stored by the pipeline as ``results`` in its run.json. A stage not run (or not written yet) gives
    an empty section; a manifest that is not JSON raises ValueError naming the file."""
    unknown = sorted(set(outputs) - set(STAGE_KEYS))
    if unknown:
        raise ValueError(f"collect: unknown output keys {unknown}; known: {', '.join(STAGE_KEYS)}")
    # a manifest file stands for its folder
    paths = {k: Path(v).parent if Path(v).is_file() else Path(v) for k, v in outputs.items() if v}
    training = {k: _training(paths[k]) for k in TRAINING_STAGES if k in paths}
    # a stage not run is an empty section (not None), so `results["eval"].get("metrics")` needs no guard
    return _clean({"funnel": _funnel(paths["curate"]) if "curate" in paths else {},
                   "feedback": _feedback(paths["pull"]) if "pull" in paths else {},
                   "training": {k: v for k, v in training.items() if v},
                   "eval": _eval(paths["eval"]) if "eval" in paths else {}, "annotation": annotation})


# ------------------------------------------------------------------------------------------------------- sections
def _header(rec: dict) -> str:
    status = str(rec.get("status") or "unknown")
    badge = status if status in ("running", "waiting", "finished", "failed") else "unknown"
    facts = [f'<span class="badge {badge}">{html.escape(status)}</span>',
             f"started {esc(rec.get('started_at'))}", f"finished {esc(rec.get('finished_at'))}",
             # no test hook: the pipeline stamps its wall time again when it saves run.json, after the report
             f"wall time {html.escape(fmt(rec.get('wall_time_s')))} s", f"commit {esc(rec.get('git_commit'))}"]
    ver = ", ".join(f"{html.escape(str(k))} {html.escape(str(v))}" for k, v in (rec.get("versions") or {}).items())
    error = rec.get("error") or None  # the report must not hide what ended a failed run
    if error is not None:
        error = error if isinstance(error, dict) else {"message": error}
        error = f'<div class="error">{esc(error.get("type") or "Error")}: {esc(error.get("message"))}</div>'
    return (f'<section id="summary"><h1>{esc(rec.get("name"))}</h1><p>{" · ".join(facts)}</p>'
            + (f'<p class="small">{ver}</p>' if ver else "") + (error or "") + "</section>")


def _banner(rec: dict) -> str:
    """The issue demands simulated rankings be labelled: by the pipeline's mode, or by the pull's sim-* names."""
    ann = rec.get("annotation") or {}
    names = lookup(rec, ("results", "feedback", "simulated_annotators")) or []
    if ann.get("mode") != "simulated" and not names:
        return ""
    who = f" ({html.escape(', '.join(map(str, names)))})" if names else ""
    return ('<div id="simulated-banner" class="banner">SIMULATED ANNOTATORS: the rankings behind the reward model '
            f"come from scripted annotators{who}, not from people.</div>")


def _annotators(rec: dict) -> str:
    """Annotator names (never a password: a user given as a dict shows its name only) with submitted counts."""
    ann = rec.get("annotation") or {}
    names = [u.get("username") or u.get("name") if isinstance(u, dict) else u for u in ann.get("users") or []]
    done = ann.get("submitted") if isinstance(ann.get("submitted"), dict) else {}
    return ", ".join(html.escape(str(n)) + (f" ({num(rec, 'annotation', 'submitted', n)} submitted)"
                                            if n in done else "") for n in names if n) or DASH


def _waiting(rec: dict) -> str:
    if rec.get("status") != "waiting":
        return ""
    ann = rec.get("annotation") or {}
    url = str(ann.get("dataset_url") or ann.get("url") or "")
    link = (f'<a href="{html.escape(url)}">{html.escape(url)}</a>' if url.startswith(("http://", "https://"))
            else esc(url or None))  # only a web address becomes a link (never javascript:)
    return (f'<div id="waiting" class="waiting"><b>Waiting for annotators:</b> {num(rec, "annotation", "completed")}'
            f' / {num(rec, "annotation", "target")} records ranked. Rank at {link}. Annotators: {_annotators(rec)}. '
            "Run <code>rlhf run</code> again to go on.</div>")


def _stages(rec: dict) -> str:
    rows = [[esc(s.get("name")), esc(s.get("status")), num(rec, "stages", i, "wall_time_s"), esc(s.get("output"))]
            for i, s in enumerate(rec.get("stages") or []) if isinstance(s, dict)]
    return section("stages", "Stages", table(["stage", "status", "wall time (s)", "output"], rows, "no stages"))


def _funnel_html(rec: dict) -> str:
    f = lookup(rec, ("results", "funnel"))
    if not f:
        return section("funnel", "Data funnel", table([], [], "curation not run"))
    p = ("results", "funnel")
    by_step = [s for s in f.get("by_step") or [] if isinstance(s, dict)]
    top = max([s[k] for s in by_step for k in ("in", "kept") if _is_num(s.get(k))] + [1])
    steps = [[esc(s.get("step")), esc(s.get("type")), num(rec, *p, "by_step", i, "in"),
              num(rec, *p, "by_step", i, "created"), num(rec, *p, "by_step", i, "kept"),
              num(rec, *p, "by_step", i, "dropped"),
              f'<div class="bar" style="width:{100 * (s["kept"] if _is_num(s.get("kept")) else 0) / top:.1f}%"></div>']
             for i, s in enumerate(by_step)]

    def keyed(key: str, head: list[str]) -> str:
        return table(head, [[esc(k), num(rec, *p, key, k)] for k in f.get(key) or {}], "none")

    dup = " · ".join(f"{k} {num(rec, *p, 'duplicates', k)}" for k in f.get("duplicates") or {}) or DASH
    return section("funnel", "Data funnel",
                    f"<p>read {num(rec, *p, 'read')} · created {num(rec, *p, 'created')} · kept "
                    f"{num(rec, *p, 'kept')} · dropped {num(rec, *p, 'dropped')}</p>",
                    table(["step", "type", "in", "created", "kept", "dropped", "kept (bar)"], steps, "no steps"),
                    '<div class="cols"><div><h3>Drops by reason</h3>', keyed("drops_by_reason", ["reason", "records"]),
                    '</div><div><h3>PII replaced</h3>', keyed("pii", ["type", "count"]),
                    '</div><div><h3>Datasets</h3>', keyed("datasets", ["dataset/split", "rows"]),
                    f"</div></div><p>Duplicates: {dup}</p>")


def _feedback_html(rec: dict) -> str:
    ann = (f"<p>annotation: mode {esc((rec.get('annotation') or {}).get('mode'))} · completed "
           f"{num(rec, 'annotation', 'completed')} / target {num(rec, 'annotation', 'target')} (of "
           f"{num(rec, 'annotation', 'total')}) · annotators: {_annotators(rec)}</p>")
    f = lookup(rec, ("results", "feedback"))
    if not f:
        return section("feedback", "Human feedback", ann, table([], [], "no rankings pulled"))
    p = ("results", "feedback")
    facts = " · ".join(f"{label} {num(rec, *p, key)}" for key, label in (
        ("records", "records ranked"), ("submitted", "responses submitted"), ("pairs", "preference pairs"),
        ("waiting", "records waiting"), ("comparisons", "comparisons"), ("pairwise_agreement", "pairwise agreement"),
        ("krippendorff_alpha", "Krippendorff alpha (ordinal)"), ("simulated", "simulated")))
    rows = [[esc(name) + (" (simulated)" if name in (f.get("simulated_annotators") or []) else ""),
             num(rec, *p, "annotators", name, "records"), num(rec, *p, "annotators", name, "pairs")]
            for name in f.get("annotators") or {}]
    return section("feedback", "Human feedback and agreement", ann, f"<p>{facts}</p>",
                    table(["annotator", "records", "pairs"], rows, "no annotators"))


def _training_html(rec: dict) -> str:
    training = lookup(rec, ("results", "training")) or {}
    parts = []
    for stage in [*TRAINING_STAGES, *[s for s in training if s not in TRAINING_STAGES]]:
        t = training.get(stage)
        if not t:
            parts.append(f'<h3>{html.escape(stage)}</h3><p class="none">{DASH} not run</p>')
            continue
        p = ("results", "training", stage)
        plots = [plot(f"{stage}.{name}", pts, f"{name} ({(t.get('curve_keys') or {}).get(name, name)})")
                 for name, pts in (t.get("curves") or {}).items() if pts]
        metrics = [[html.escape(k), num(rec, *p, "metrics", k)] for k in t.get("metrics") or {}]
        parts.append(f"<h3>{html.escape(stage)}: {esc(t.get('kind'))} run, {esc(t.get('status'))}, "
                     f"{num(rec, *p, 'wall_time_s')} s</h3>" + ("" if plots else '<p class="none">no logged steps</p>')
                     + f'<div class="plots">{"".join(plots)}{table(["metric", "value"], metrics, "no metrics")}</div>')
    return section("training", "Training", *parts)


def _eval_html(rec: dict) -> str:
    p = ("results", "eval", "metrics")
    m = lookup(rec, p)
    if not m:
        return section("eval", "Evaluation", table([], [], "evaluation not run"))
    cols = ("base", "sft", "policy")
    rows = [[label] + [num(rec, *p, key, c, pct=pct) for c in cols] for key, label, pct in (
        ("perplexity", "perplexity (held-out)", False), ("general_perplexity", "perplexity (general text)", False),
        ("mean_reward", "mean reward", False), ("no_eos_rate", "answers without EOS", True))]
    singles = [("reward_accuracy", "RM accuracy", True), ("reward_margin", "RM margin", False),
               ("reward_pairs", "RM pairs", False), ("reference_reward", "mean reward of the references", False),
               ("prompts", "prompts", False)]
    wins = [("policy_vs_sft", "policy vs SFT"), ("policy_vs_base", "policy vs base"), ("sft_vs_base", "SFT vs base")]
    more = ([[label, num(rec, *p, key, pct=pct)] for key, label, pct in singles]
            + [[f"win rate {label}", num(rec, *p, "win_rate", key, pct=True)] for key, label in wins]
            + [[f"tokens ({k})", num(rec, *p, "tokens", k)] for k in ("heldout", "general")])
    return section("eval", "Evaluation", table(["metric", "base", "SFT", "policy"], rows),
                    table(["metric", "value"], more))


def _text(v: Any) -> str:
    """A sample field: plain text, or a conversation (list of {role, content}) one turn a line."""
    if isinstance(v, list):
        v = "\n".join(f"{m.get('role')}: {m.get('content')}" if isinstance(m, dict) else str(m) for m in v)
    return f'<div class="text">{esc(v)}</div>'


def _samples_html(rec: dict) -> str:
    samples = lookup(rec, ("results", "eval", "samples")) or []
    cards = []
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            continue
        p = ("results", "eval", "samples", i, "score")
        cols = "".join(f'<div><h4>{c} · score {num(rec, *p, c)}</h4>{_text(s.get(c))}</div>'
                       for c in ("base", "sft", "policy"))
        cards.append(f'<div class="sample"><h4>prompt</h4>{_text(s.get("prompt"))}<h4>reference</h4>'
                     f'{_text(s.get("reference"))}<div class="side">{cols}</div></div>')
    return section("samples", "Sample generations", "".join(cards) or f'<p class="none">{DASH} no samples</p>')


def render(record: dict) -> str:
    """The complete page for a pipeline run record (its run.json: name, status, stages, annotation, results)."""
    body = "".join(part(record) for part in (_header, _banner, _waiting, _stages, _funnel_html, _feedback_html,
                                              _training_html, _eval_html, _samples_html))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(record.get("name"))} report'
            f'</title><meta name="viewport" content="width=device-width"><style>{CSS}</style></head>'
            f"<body>{body}</body></html>\n")


def write(run_dir: Path, record: dict) -> Path:
    """``run_dir/report.html``, written atomically (a reader never sees half a page); returns its path."""
    from alignment.runs import write_text_atomic  # here: importing this module loads only the standard library

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / REPORT_FILE, render(record))
    return run_dir / REPORT_FILE
