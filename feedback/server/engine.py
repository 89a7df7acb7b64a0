"""A search engine for argilla_server that uses Argilla's own SQL tables as its index (no Elasticsearch).

Mutations (index/update/delete) are no-ops: the records, responses and suggestions are already in SQL. Queries read
them back. This first version evaluates filters/sorts in Python over one dataset's rows (fine for small datasets);
pushing the UI's default query into SQL is the next step (issue 4: < 100 ms at 10k records).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from typing import Any, Iterable, List, Optional, Union

from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from argilla_server.database import AsyncSessionLocal
from argilla_server.enums import RecordStatus, SimilarityOrder, SortOrder
from argilla_server.models import Dataset, MetadataProperty, Record, Response, Suggestion, User, VectorSettings
from argilla_server.search_engine import (
    AndFilter,
    FloatMetadataMetrics,
    IntegerMetadataMetrics,
    MetadataFilterScope,
    RangeFilter,
    RecordFilterScope,
    ResponseFilterScope,
    SearchEngine,
    SearchResponseItem,
    SearchResponses,
    SuggestionFilterScope,
    TermsFilter,
    TermsMetrics,
    TextQuery,
)

ENGINE_NAME = "rlhf-sql"
_MISSING = object()


def _values_of(record: Record, scope, user_id=None) -> list:
    """All values a record has for a filter/sort scope (a list: responses and suggestions can give several)."""
    if isinstance(scope, RecordFilterScope):
        value = getattr(record, scope.property, None)
        return [] if value is None else [str(value) if scope.property in ("id", "status") else value]
    if isinstance(scope, MetadataFilterScope):
        value = (record.metadata_ or {}).get(scope.metadata_property)
        if value is None:
            return []
        return list(value) if isinstance(value, list) else [value]
    if isinstance(scope, SuggestionFilterScope):
        out = []
        for s in record.suggestions:
            if s.question.name != scope.question:
                continue
            value = getattr(s, scope.property, None) if scope.property != "value" else s.value
            if value is None:
                continue
            out.extend(value if isinstance(value, list) else [value])
        return out
    if isinstance(scope, ResponseFilterScope):
        responses = [r for r in record.responses if scope.user is None or r.user_id == scope.user.id]
        if scope.property == "status" or (scope.question is None and scope.property is None):
            statuses = [str(r.status) for r in responses]
            return statuses or (["pending"] if scope.user is not None else [])
        out = []
        for r in responses:
            item = (r.values or {}).get(scope.question)
            if not item:
                continue
            value = item.get("value")
            if isinstance(value, list):  # ranking -> [{value, rank}], multi label -> [labels]
                out.extend(v.get("value") if isinstance(v, dict) else v for v in value)
            elif value is not None:
                out.append(value)
        return out
    raise ValueError(f"unsupported scope {scope!r}")


def _matches(record: Record, flt) -> bool:
    if flt is None:
        return True
    if isinstance(flt, AndFilter):
        return all(_matches(record, f) for f in flt.filters)
    if isinstance(flt, TermsFilter):
        wanted = {str(v) for v in flt.values}
        if isinstance(flt.scope, ResponseFilterScope) and flt.scope.property == "status" and flt.scope.user is None:
            statuses = {str(r.status) for r in record.responses}
            if "pending" in wanted and not statuses:
                return True
            return bool(statuses & wanted)
        return any(str(v) in wanted for v in _values_of(record, flt.scope))
    if isinstance(flt, RangeFilter):
        for v in _values_of(record, flt.scope):
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if (flt.ge is None or v >= flt.ge) and (flt.le is None or v <= flt.le):
                return True
        return False
    raise ValueError(f"unsupported filter {flt!r}")


def _text_of(record: Record, field: Optional[str]) -> str:
    fields = record.fields or {}
    items = [fields.get(field)] if field else list(fields.values())
    return " ".join(str(v) for v in items if v is not None).lower()


def _matches_text(record: Record, query) -> bool:
    if query is None:
        return True
    if isinstance(query, str):
        query = TextQuery(q=query)
    text = _text_of(record, query.field)
    return all(term in text for term in query.q.lower().split())  # AND semantics


def _sort_key_value(record: Record, scope):
    values = [v for v in _values_of(record, scope) if v is not None]
    if not values:
        return None
    numeric = []
    for v in values:
        try:
            numeric.append(float(v))
        except (TypeError, ValueError):
            return str(v)
    return sum(numeric) / len(numeric)  # several responses: their average


@SearchEngine.register(ENGINE_NAME)
class SQLSearchEngine(SearchEngine):
    @classmethod
    async def new_instance(cls) -> "SQLSearchEngine":
        return cls()

    async def close(self):
        pass

    async def ping(self) -> bool:
        return True

    async def info(self) -> dict:
        return {"engine": ENGINE_NAME, "backend": "argilla-sql"}

    # mutations: the SQL tables are the index
    async def create_index(self, dataset: Dataset):
        pass

    async def delete_index(self, dataset: Dataset):
        pass

    async def configure_metadata_property(self, dataset: Dataset, metadata_property: MetadataProperty):
        pass

    async def index_records(self, dataset: Dataset, records: Iterable[Record]):
        pass

    async def partial_record_update(self, record: Record, **update):
        pass

    async def delete_records(self, dataset: Dataset, records: Iterable[Record]):
        pass

    async def update_record_response(self, response: Response):
        pass

    async def delete_record_response(self, response: Response):
        pass

    async def update_record_suggestion(self, suggestion: Suggestion):
        pass

    async def delete_record_suggestion(self, suggestion: Suggestion):
        pass

    async def configure_index_vectors(self, vector_settings: VectorSettings):
        pass

    # queries
    async def _load(self, dataset_id, with_vectors: bool = False) -> List[Record]:
        options = [selectinload(Record.responses), selectinload(Record.suggestions).selectinload(Suggestion.question)]
        if with_vectors:
            options.append(selectinload(Record.vectors))
        async with AsyncSessionLocal() as db:
            q = select(Record).where(Record.dataset_id == dataset_id).options(*options).order_by(Record.inserted_at)
            return list((await db.scalars(q)).all())

    async def get_dataset_progress(self, dataset: Dataset) -> dict:
        if dataset.is_draft:
            return {}
        async with AsyncSessionLocal() as db:
            rows = (
                await db.execute(
                    select(Record.status, func.count(Record.id))
                    .where(Record.dataset_id == dataset.id)
                    .group_by(Record.status)
                )
            ).all()
        counts = {str(status): n for status, n in rows}
        return {"total": sum(counts.values()), **counts}

    async def get_dataset_user_progress(self, dataset: Dataset, user: User) -> dict:
        if dataset.is_draft:
            return {}
        async with AsyncSessionLocal() as db:
            rows = (
                await db.execute(
                    select(Response.status, func.count(Response.id))
                    .join(Record, Record.id == Response.record_id)
                    .where(Record.dataset_id == dataset.id, Response.user_id == user.id)
                    .group_by(Response.status)
                )
            ).all()
        counts = {str(status): n for status, n in rows}
        return {"total": sum(counts.values()), **counts}

    async def search(
        self,
        dataset: Dataset,
        query: Optional[Union[TextQuery, str]] = None,
        filter=None,
        sort=None,
        offset: int = 0,
        limit: int = 100,
        user_id: Optional[str] = None,  # the /me/ handler passes it; not in the abstract signature
        **_: Any,
    ) -> SearchResponses:
        records = [r for r in await self._load(dataset.id) if _matches(r, filter) and _matches_text(r, query)]
        if sort:
            for order in reversed(sort):  # stable sorts, last key first; missing values always last
                present = [r for r in records if _sort_key_value(r, order.scope) is not None]
                missing = [r for r in records if _sort_key_value(r, order.scope) is None]
                present.sort(key=lambda r: _sort_key_value(r, order.scope), reverse=order.order == SortOrder.desc)
                records = present + missing
        elif user_id:  # deterministic per-user order, like the ES engine's seeded random_score
            records.sort(key=lambda r: hashlib.sha1(f"{user_id}:{r.id}".encode()).hexdigest())
        page = records[offset : offset + limit]
        return SearchResponses(items=[SearchResponseItem(record_id=r.id, score=None) for r in page], total=len(records))

    async def compute_metrics_for(self, metadata_property: MetadataProperty):
        records = await self._load(metadata_property.dataset_id)
        values = []
        for r in records:
            v = (r.metadata_ or {}).get(metadata_property.name)
            if v is not None:
                values.extend(v if isinstance(v, list) else [v])
        kind = str(metadata_property.type)
        if kind == "terms":
            counts = Counter(str(v) for v in values)
            return TermsMetrics(
                total=len(counts),
                values=[TermsMetrics.TermCount(term=t, count=c) for t, c in counts.most_common()],
            )
        cls = IntegerMetadataMetrics if kind == "integer" else FloatMetadataMetrics
        return cls(min=min(values) if values else None, max=max(values) if values else None)

    async def similarity_search(
        self,
        dataset: Dataset,
        vector_settings: VectorSettings,
        value: Optional[List[float]] = None,
        record: Optional[Record] = None,
        query=None,
        filter=None,
        max_results: int = 100,
        order: SimilarityOrder = SimilarityOrder.most_similar,
        threshold: Optional[float] = None,
    ) -> SearchResponses:
        if value is None and record is not None:
            value = record.vector_value_by_vector_settings(vector_settings)
        records = await self._load(dataset.id, with_vectors=True)
        norm_q = math.sqrt(sum(x * x for x in value or [])) or 1.0
        scored = []
        for r in records:
            if record is not None and r.id == record.id:
                continue
            if not (_matches(r, filter) and _matches_text(r, query)):
                continue
            vec = r.vector_value_by_vector_settings(vector_settings)
            if not vec:
                continue
            norm_v = math.sqrt(sum(x * x for x in vec)) or 1.0
            cos = sum(a * b for a, b in zip(value, vec)) / (norm_q * norm_v)
            score = (1 + cos) / 2
            if threshold is not None and score < threshold:
                continue
            scored.append((score, r.id))
        scored.sort(key=lambda t: t[0], reverse=order == SimilarityOrder.most_similar)
        scored = scored[:max_results]
        return SearchResponses(items=[SearchResponseItem(record_id=i, score=s) for s, i in scored], total=len(scored))
