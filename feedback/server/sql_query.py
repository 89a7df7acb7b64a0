"""Compiles one record search of argilla_server (text query, filters, sort) into SQL over Argilla's own tables.

The embedded server's search engine (``engine.py``) answers from the records, responses and suggestions already in
the server's SQLite database; this module turns a search into the WHERE and ORDER BY of one statement (sqlalchemy
over argilla_server's models): EXISTS subqueries for responses and suggestions, json_each/json_extract for metadata
and field text. Runs in the server venv; ``launcher.py`` puts this folder on ``sys.path``, so it is imported as
``sql_query``, like ``engine``.

Semantics follow argilla_server's Elasticsearch engine (search_engine/commons.py) except where noted:
* text query: every word must occur (AND), case-insensitively for ASCII, in any text/chat/custom field or in the one
  named; a word matches as a substring (SQL LIKE) where ES matches whole analysed tokens;
* response status "pending" = no response of the searching user (or of anyone when the search has no user);
* sort: missing values last in either direction (ES's default ``missing: _last``); ties, and searches without a sort,
  follow a per-user pseudo-random order (ES: ``random_score`` seeded by the user id), else insertion order;
* sorting by responses averages the rating answers (ES ``mode: avg``); sorts and filters on answers that have no
  order or are not indexed by ES (ranking, text, span; multi-label for sorts) are rejected with 422 and a reason.
SQLite only (json_each, rowid), like the embedded server it runs in.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Iterable, List, Optional, Union
from uuid import UUID

from sqlalchemy import (
    Integer, String, and_, case, cast, exists, false, func, literal_column, or_, select, true, type_coerce,
)

from argilla_server.enums import QuestionType, SortOrder
from argilla_server.errors.future import UnprocessableEntityError
from argilla_server.models import Field, Question, Record, Response, Suggestion
from argilla_server.search_engine import (
    AndFilter, MetadataFilterScope, RangeFilter, RecordFilterScope, ResponseFilterScope, SuggestionFilterScope,
    TermsFilter, TextQuery,
)

ENGINE_NAME = "rlhf-sql"  # what ARGILLA_SEARCH_ENGINE names (feedback.server_ctl sets it); in 422 messages too
ROWID = literal_column("records.rowid", Integer)  # insertion order, like ES's _seq_no
_PRIME = 2_147_483_647  # 2**31 - 1, prime and = 3 (mod 4): see _user_order
# status through CAST: without ANALYZE statistics SQLite would drive the scan by ix_records_status, which spans every
# dataset, instead of ix_records_dataset_id (measured: the UI query on 1k records next to a 10k dataset, 12x slower)
_RECORD_TERMS = {"id": Record.id, "external_id": Record.external_id, "status": cast(Record.status, String)}
_RECORD_DATES = {"inserted_at": Record.inserted_at, "updated_at": Record.updated_at}
NUMERIC = ("integer", "real")  # json_each/json_type names of numeric JSON values
# ES indexes only these answers (commons.es_mapping_for_question); the others cannot be filtered or sorted
_FILTERABLE = {QuestionType.rating, QuestionType.label_selection, QuestionType.multi_label_selection}
_SUGGESTION_SORTABLE = {QuestionType.rating, QuestionType.label_selection}  # one scalar value per record


def _unsupported(what: str) -> UnprocessableEntityError:
    return UnprocessableEntityError(f"the embedded server's search engine ({ENGINE_NAME}) does not support {what}")


def json_path(name: str, tail: str = "") -> str:
    """JSON path of a key, quoted so names with '-' work."""
    return f'$."{name}"{tail}'


def json_elements(json_value, path: Optional[str] = None):
    """A JSON value as a table: one row for a scalar, one per item for an array (ES matches any item)."""
    return func.json_each(json_value, *([path] if path else [])).table_valued("value", "type")


def _datetime(value) -> datetime:
    """A range bound for a date: ISO 8601 text, or a number of epoch milliseconds (ES's default date format)."""
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value / 1000, tz=timezone.utc).replace(tzinfo=None)
    parsed = datetime.fromisoformat(str(value))
    return parsed.astimezone(timezone.utc).replace(tzinfo=None) if parsed.tzinfo else parsed  # stored naive UTC


def _uuid(value: str) -> Optional[UUID]:
    try:
        return UUID(str(value))
    except ValueError:
        return None  # an id that cannot exist matches nothing


def _number(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UnprocessableEntityError(f"range bound {name}={value!r} is not a number") from None


def _range(value, flt: RangeFilter, convert=lambda v, n: v):
    bounds = [value >= convert(flt.ge, "ge")] if flt.ge is not None else []
    bounds += [value <= convert(flt.le, "le")] if flt.le is not None else []
    return and_(true(), *bounds)


def _element_matches(elements, flt) -> object:
    """Condition on one row of json_elements: its text in the terms, or its number within the range."""
    if isinstance(flt, TermsFilter):
        return cast(elements.c.value, String).in_([str(v) for v in flt.values])
    return and_(elements.c.type.in_(NUMERIC), _range(elements.c.value, flt, _number))


def _like(text, word: str):
    escaped = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return text.like(f"%{escaped}%", escape="\\")  # SQLite's LIKE ignores ASCII case


def _scopes(flt) -> list:
    """The scopes a filter tree mentions."""
    if flt is None:
        return []
    if isinstance(flt, AndFilter):
        return [scope for f in flt.filters for scope in _scopes(f)]
    return [flt.scope]


def _user_order(user_id) -> object:
    """A pseudo-random order of the records, the same on every call for one user and different between users, so
    annotators sharing a dataset start on different records (the ES engine's random_score seeded by the user id).
    An affine map of the rowid with constants from the user id, then the quadratic-residue permutation of [0, p)
    (x*x mod p, mirrored above p/2; Preshing 2012, "How to generate a sequence of unique random integers"). Plain SQL
    integer arithmetic, so it costs no Python call per row; every product stays below 2**62."""
    digest = hashlib.sha256(str(user_id).encode()).digest()
    a = int.from_bytes(digest[:4], "big") % (_PRIME - 1) + 1
    b = int.from_bytes(digest[4:8], "big") % _PRIME
    x = (ROWID % _PRIME * a + b) % _PRIME
    return case((x <= _PRIME // 2, x * x % _PRIME), else_=_PRIME - x * x % _PRIME)


class QueryCompiler:
    """Turns one search's text query, filter and sort into SQL over one dataset's records."""

    def __init__(self, dataset_id, questions: Iterable[Question], fields: Iterable[Field]):
        self.dataset_id = dataset_id
        self.questions = {q.name: q for q in questions}
        self.fields = {f.name: f for f in fields}

    @classmethod
    async def load(cls, db, dataset_id, query=None, flt=None, sort=None) -> "QueryCompiler":
        """Reads the dataset's questions and fields only when the search names questions or has text (the UI's
        queue query needs neither: two queries saved)."""
        scopes = _scopes(flt) + [order.scope for order in sort or []]
        questions = fields = []
        if any(isinstance(s, SuggestionFilterScope) or isinstance(s, ResponseFilterScope) and s.question
               for s in scopes):
            questions = (await db.scalars(select(Question).where(Question.dataset_id == dataset_id))).all()
        if query:
            fields = (await db.scalars(select(Field).where(Field.dataset_id == dataset_id))).all()
        return cls(dataset_id, questions, fields)

    def where(self, query: Optional[Union[TextQuery, str]] = None, flt=None) -> list:
        conditions = [Record.dataset_id == self.dataset_id]
        if flt is not None:
            conditions.append(self.condition(flt))
        if query:
            conditions.append(self.text(TextQuery(q=query) if isinstance(query, str) else query))
        return conditions

    def order_by(self, sort, user_id=None) -> list:
        terms = []
        for order in sort or []:
            key = self.sort_key(order.scope)
            terms += [key.is_(None), key.desc() if order.order == SortOrder.desc else key.asc()]  # missing last
        return terms + ([_user_order(user_id)] if user_id else []) + [ROWID]

    # text -----------------------------------------------------------------------------------------------------
    def text(self, query: TextQuery):
        fields = [f for f in self.fields.values() if not f.is_image and query.field in (None, f.name)]
        return and_(true(), *(self._word(fields, word) for word in query.q.split()))

    def _word(self, fields: List[Field], word: str):
        in_a_field = or_(false(), *(self._field_contains(f, word) for f in fields))
        if word.isascii() and word.isprintable() and not {'"', "\\"} & set(word):
            # A cheap first pass over the raw JSON: such a word appears verbatim in it when a field contains it
            # (json.dumps escapes only non-ASCII, quotes, backslashes and control characters), so only records that
            # pass pay for json_extract per field (measured: -25% at 10k records).
            return and_(_like(type_coerce(Record.fields, String), word), in_a_field)
        return in_a_field

    @staticmethod
    def _field_contains(field: Field, word: str):
        if field.is_chat:  # a list of {role, content}: search the contents
            messages = json_elements(Record.fields, json_path(field.name))
            return exists(select(1).select_from(messages)
                          .where(_like(func.json_extract(messages.c.value, "$.content"), word)))
        return _like(func.json_extract(Record.fields, json_path(field.name)), word)  # decoded text, not JSON escapes

    # filters --------------------------------------------------------------------------------------------------
    def condition(self, flt):
        if isinstance(flt, AndFilter):
            return and_(true(), *(self.condition(f) for f in flt.filters))
        scope = flt.scope
        if isinstance(scope, RecordFilterScope):
            return self._record_condition(flt)
        if isinstance(scope, MetadataFilterScope):
            values = json_elements(Record.metadata_, json_path(scope.metadata_property))
            return exists(select(1).select_from(values).where(_element_matches(values, flt)))
        if isinstance(scope, SuggestionFilterScope):
            return self._suggestion_condition(flt)
        if isinstance(scope, ResponseFilterScope):
            return self._response_condition(flt)
        raise _unsupported(f"filter scope {scope!r}")

    @staticmethod
    def _record_condition(flt):
        prop = flt.scope.property
        if isinstance(flt, TermsFilter) and prop in _RECORD_TERMS:
            values = [_uuid(v) for v in flt.values] if prop == "id" else [str(v) for v in flt.values]
            return _RECORD_TERMS[prop].in_([v for v in values if v is not None])
        if isinstance(flt, RangeFilter) and prop in _RECORD_DATES:
            return _range(_RECORD_DATES[prop], flt, lambda v, _: _datetime(v))
        kind = "terms" if isinstance(flt, TermsFilter) else "range"
        raise _unsupported(f"a {kind} filter on record {prop} (terms: id, external_id, status; range: inserted_at, "
                           "updated_at)")

    def _question(self, name: str, allowed: set, what: str) -> Question:
        question = self.questions.get(name)
        if question is None:
            raise UnprocessableEntityError(f"question `{name}` not found in dataset `{self.dataset_id}`")
        if question.type not in allowed:
            raise _unsupported(f"{what} of {question.type} question `{name}` (only "
                               f"{', '.join(sorted(str(t) for t in allowed))})")
        return question

    def _suggestion_condition(self, flt):
        prop = flt.scope.property or "value"
        allowed = _FILTERABLE if prop == "value" else set(QuestionType)
        question = self._question(flt.scope.question, allowed, "filtering by suggestion values")
        of_question = [Suggestion.record_id == Record.id, Suggestion.question_id == question.id]
        if prop in ("agent", "type"):
            if not isinstance(flt, TermsFilter):
                raise _unsupported(f"a range filter on suggestion {prop}")
            return exists(select(1).where(*of_question, cast(getattr(Suggestion, prop), String).in_(flt.values)))
        values = json_elements(getattr(Suggestion, prop))  # value or score: scalars, or lists for multi-item questions
        return exists(select(1).select_from(Suggestion).join(values, true())
                      .where(*of_question, _element_matches(values, flt)))

    def _response_condition(self, flt):
        scope = flt.scope
        mine = [Response.record_id == Record.id] + ([Response.user_id == scope.user.id] if scope.user else [])
        if scope.question:
            question = self._question(scope.question, _FILTERABLE, "filtering by responses")
            values = json_elements(Response.values, json_path(question.name, ".value"))
            return exists(select(1).select_from(Response).join(values, true())
                          .where(*mine, _element_matches(values, flt)))
        if scope.property == "status" and isinstance(flt, TermsFilter):
            statuses = {str(v) for v in flt.values}
            either = [~exists(select(1).where(*mine))] if "pending" in statuses else []  # pending = no response
            if statuses - {"pending"}:
                either.append(exists(select(1).where(*mine, Response.status.in_(statuses - {"pending"}))))
            return or_(*either)
        raise _unsupported("a response filter without a question other than a terms filter on status")

    # sort -----------------------------------------------------------------------------------------------------
    def sort_key(self, scope):
        if isinstance(scope, RecordFilterScope):
            return {**_RECORD_TERMS, **_RECORD_DATES}[scope.property]
        if isinstance(scope, MetadataFilterScope):
            return func.json_extract(Record.metadata_, json_path(scope.metadata_property))
        if isinstance(scope, SuggestionFilterScope):
            return self._suggestion_key(scope)
        if isinstance(scope, ResponseFilterScope) and scope.question:
            question = self._question(scope.question, {QuestionType.rating}, "sorting by responses")
            mine = [Response.record_id == Record.id] + ([Response.user_id == scope.user.id] if scope.user else [])
            rating = func.json_extract(Response.values, json_path(question.name, ".value"))
            return select(func.avg(rating)).where(*mine).scalar_subquery()  # the average of the users' ratings
        raise _unsupported("sorting by response status")

    def _suggestion_key(self, scope):
        prop = scope.property or "value"
        allowed = _SUGGESTION_SORTABLE if prop == "value" else set(QuestionType)
        question = self._question(scope.question, allowed, "sorting by suggestion values")
        of_question = [Suggestion.record_id == Record.id, Suggestion.question_id == question.id]
        if prop in ("agent", "type"):
            return select(getattr(Suggestion, prop)).where(*of_question).scalar_subquery()
        values = json_elements(getattr(Suggestion, prop))  # a multi-item suggestion sorts by its highest score
        return select(func.max(values.c.value)).select_from(Suggestion).join(values, true()) \
            .where(*of_question).scalar_subquery()

