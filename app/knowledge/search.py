"""Searching vector stores: hybrid (pgvector fused with full-text search) or full-text alone.

Two ranked lists of candidates, each as long as `candidates(max_num_results)`, within the
stores and passing the `filters`:

- by meaning (mode `hybrid` with a query embedding): the chunks nearest the query's embedding by
  cosine distance. Stores small enough (`EXACT_SCAN_MAX_CHUNKS` in all) are scanned exactly: the
  HNSW index covers every store, and pgvector 0.6 filters what it returns afterwards, so a small
  store among large ones would come back short (and the filters with it). Larger ones use the
  index, `ef_search` raised by how small a share of the table they are (at least
  `MIN_EF_SEARCH`). The limit is a latency trade: an exact scan detoasts every 6 kB vector,
  about 16 us a chunk (bench/knowledge_core.py: 33 ms p50 at 2,000 chunks, 80 ms at 5,000;
  the index answers in 10-20 ms);
- by words: `websearch_to_tsquery('english', query)` (all words; quotes and `-word` as on the
  web), topped up when that finds fewer than the list holds by chunks with any of the query's
  words, so a question in natural language still finds passages; ordered by how many of the
  query's terms a chunk holds, then by `ts_rank_cd`.

The lists are fused by reciprocal rank (k = 60) and the results come in that order.

The score is not the fusion's value (that only says where a chunk ranked, and is high for the
best of poor matches too) but how well the chunk matches, in [0, 1], so `score_threshold` means
the same whatever else is in the store:

- `coverage`: the share of the query's search terms (its words, stemmed, without stop words)
  the chunk holds;
- hybrid: the mean of the chunk's cosine similarity to the query (below 0 counts as 0) and its
  coverage; full text (and a chunk stored without embedding): the coverage alone.

In hybrid mode the scores therefore need not decrease strictly down the list. Everything the
user sends reaches the SQL as parameters.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from app.errors import InvalidRequest
from app.knowledge.db import Connectable, RetrievalMode, connection, transaction, vector_literal
from app.knowledge.filters import ComparisonFilter, CompoundFilter, filter_sql

RRF_K = 60
DEFAULT_MAX_RESULTS = 10
MAX_RESULTS = 50
# Up to this many chunks in the stores searched, an exact scan: 52 ms p50 at 10,000 (vectors stored inline,
# migration 0019), every answer found, where HNSW (19 ms) put it first in 18% of queries (simulated vectors).
EXACT_SCAN_MAX_CHUNKS = 10_000
# pgvector's default (40) finds about a third of the true ten nearest of the simulated embedding's
# sparse vectors in 10,000 chunks; 100 finds 57% for half a millisecond more (real embeddings do better).
MIN_EF_SEARCH = 100
MAX_EF_SEARCH = 1000  # pgvector's limit
STORE_COUNT_CAP = 50_000  # counting a store's chunks stops there (a few ms of its index): enough to size ef_search
MAX_QUERY_WORDS = 64
SEARCH_WORD = re.compile(r"[^\W_]+")  # letters and digits: nothing to_tsquery would read as an operator
# Dropped by rewrite_query: what makes a question a question, not what it is about.
QUESTION_WORD_LIST = """
a about an any are can could describe did do does explain find for give how i i'd i'm is it know let
like list many me might much my please should show some tell that the there to us want was we were
what when where which who whom whose why will with would you
"""
QUESTION_WORDS = frozenset(QUESTION_WORD_LIST.split())

# Chunks of files indexed, or being indexed again (a reindex keeps the old ones until the new are written).
CHUNK_FILE = (
    "JOIN vector_store_file f ON f.vector_store_id = c.vector_store_id AND f.file_id = c.file_id"
    " AND f.status IN ('completed', 'in_progress')"
)
COVERAGE = (
    "((SELECT count(*) FROM unnest(q.terms) AS t(term) WHERE t.term = ANY(tsvector_to_array(c.tsv)))::float8"
    " / greatest(cardinality(q.terms), 1))"
)
COSINE = "greatest(0, least(1, 1 - (c.embedding <=> (SELECT v FROM query_vector))))"
STORE_SIZE = """
    SELECT (SELECT count(*) FROM (SELECT 1 FROM knowledge_chunk WHERE vector_store_id = ANY($1::uuid[]) LIMIT $2) s),
           (SELECT reltuples FROM pg_class WHERE oid = 'knowledge_chunk'::regclass)
"""


# The last step of both: threshold, order (`rank`: lower is better), limit, and the file's name and attributes.
RESULTS = """
    SELECT s.id, s.vector_store_id, s.file_id, s.ordinal, s.text, s.score,
           file.filename, f.attributes::text AS attributes
    FROM scored s
    JOIN vector_store_file f ON f.vector_store_id = s.vector_store_id AND f.file_id = s.file_id
    JOIN file ON file.id = s.file_id
    WHERE s.score >= $6
    ORDER BY s.rank, s.id
    LIMIT $7
"""


@dataclass(frozen=True, slots=True)
class SearchResult:
    vector_store_id: uuid.UUID
    file_id: uuid.UUID
    filename: str
    attributes: dict[str, Any]
    chunk_id: int
    ordinal: int
    text: str
    score: float


def rewrite_query(query: str) -> str:
    """The query as keywords: question words, fillers and punctuation dropped (the query itself when
    nothing else would be left). Deterministic, offline: what `rewrite_query: true` searches for."""
    words = [word for word in re.findall(r"[\w'-]+", query) if word.lower().strip("'-") not in QUESTION_WORDS]
    kept = " ".join(word.strip("'-") for word in words if word.strip("'-"))
    return kept or query.strip()


def candidates(max_num_results: int) -> int:
    """How long each ranked list is before fusion: deep enough that a chunk second on one list and
    twentieth on the other still meets the threshold and the limit."""
    return min(200, max(50, 4 * max_num_results))


async def search(
    db: Connectable,
    vector_store_ids: Sequence[uuid.UUID],
    query: str,
    query_embedding: Sequence[float] | None,
    *,
    mode: RetrievalMode,
    max_num_results: int = DEFAULT_MAX_RESULTS,
    filters: ComparisonFilter | CompoundFilter | None = None,
    score_threshold: float = 0.0,
) -> list[SearchResult]:
    """The best chunks for `query` in the stores, best first (see the module's docstring for the
    ranking and the score). Without `query_embedding`, or in mode `full_text`, by words alone."""
    if not 1 <= max_num_results <= MAX_RESULTS:
        raise InvalidRequest(f"max_num_results must be between 1 and {MAX_RESULTS}.", param="max_num_results")
    if not 0.0 <= score_threshold <= 1.0:
        raise InvalidRequest("score_threshold must be between 0 and 1.", param="ranking_options.score_threshold")
    if not vector_store_ids:
        return []
    words = query_words(query)
    depth = candidates(max_num_results)
    params: list[object] = [
        list(vector_store_ids),
        query,
        " | ".join(words),
        " ".join(words),
        depth,
        score_threshold,
        max_num_results,
    ]
    hybrid = mode is RetrievalMode.HYBRID and query_embedding is not None
    if mode is RetrievalMode.HYBRID and query_embedding is not None:
        params.append(vector_literal(query_embedding))
    where = f" AND {filter_sql(filters, params, 'f.attributes')}" if filters is not None else ""
    async with connection(db) as conn, transaction(conn):
        exact = True
        if hybrid:
            size = await conn.fetchrow(
                STORE_SIZE, list(vector_store_ids), max(STORE_COUNT_CAP, EXACT_SCAN_MAX_CHUNKS + 1)
            )
            assert size is not None
            in_stores, in_table = int(size[0]), float(size[1])
            exact = in_stores <= EXACT_SCAN_MAX_CHUNKS
            if not exact:
                share = max(in_table, in_stores) / max(in_stores, 1)
                ef_search = min(MAX_EF_SEARCH, max(MIN_EF_SEARCH, int(depth * share)))
                await conn.execute("SELECT set_config('hnsw.ef_search', $1, true)", str(ef_search))
        rows = await conn.fetch(statement(hybrid, exact, where), *params)
    return [
        SearchResult(
            vector_store_id=row["vector_store_id"],
            file_id=row["file_id"],
            filename=row["filename"],
            attributes=orjson.loads(row["attributes"]),
            chunk_id=row["id"],
            ordinal=row["ordinal"],
            text=row["text"],
            score=float(row["score"]),
        )
        for row in rows
    ]


def query_words(query: str) -> list[str]:
    """The words any of which a chunk may hold to be a candidate (not those the query excludes: `-word`)."""
    wanted = " ".join(token for token in query.split() if not token.startswith("-"))
    return SEARCH_WORD.findall(wanted.lower())[:MAX_QUERY_WORDS]


def statement(hybrid: bool, exact: bool, where: str) -> str:
    """The search's SQL. Parameters: $1 store ids, $2 the query, $3 its words joined by `|`, $4 by
    spaces, $5 the lists' length, $6 the score threshold, $7 the limit, $8 the query vector (hybrid),
    then the filters'. `where` is the compiled filter (on `f`), or empty."""
    text_lists = f"""
        query AS (
            SELECT websearch_to_tsquery('english', $2) AS strict, to_tsquery('english', $3) AS loose,
                   tsvector_to_array(to_tsvector('english', $4)) AS terms
        ),
        strict_hits AS (
            SELECT c.id, ts_rank_cd(c.tsv, q.strict) AS rank
            FROM knowledge_chunk c {CHUNK_FILE} CROSS JOIN query q
            WHERE c.vector_store_id = ANY($1::uuid[]) AND c.tsv @@ q.strict{where}
            ORDER BY rank DESC, c.id LIMIT $5
        ),
        loose_hits AS (
            SELECT c.id, ts_rank_cd(c.tsv, q.loose) AS rank
            FROM knowledge_chunk c {CHUNK_FILE} CROSS JOIN query q
            WHERE (SELECT count(*) FROM strict_hits) < $5
              AND c.vector_store_id = ANY($1::uuid[]) AND c.tsv @@ q.loose{where}
              AND c.id NOT IN (SELECT id FROM strict_hits)
            ORDER BY rank DESC, c.id LIMIT $5
        ),
        text_hits AS (
            SELECT ranked.id, ranked.position FROM (
                SELECT h.id, row_number() OVER (ORDER BY {COVERAGE} DESC, h.rank DESC, h.id) AS position
                FROM (SELECT id, rank FROM strict_hits UNION ALL SELECT id, rank FROM loose_hits) h
                JOIN knowledge_chunk c ON c.id = h.id CROSS JOIN query q
            ) ranked
            WHERE ranked.position <= $5
        )"""
    if not hybrid:
        return f"""
            WITH {text_lists},
            scored AS (
                SELECT c.id, c.vector_store_id, c.file_id, c.ordinal, c.text, h.position AS rank, {COVERAGE} AS score
                FROM text_hits h JOIN knowledge_chunk c ON c.id = h.id CROSS JOIN query q
            )
            {RESULTS}
        """
    # Exact: the distances computed in a subquery Postgres may not flatten (OFFSET 0), so the HNSW index
    # cannot serve the ORDER BY: every chunk of the stores that passes the filters, each distance once.
    fence = "OFFSET 0" if exact else "ORDER BY c.embedding <=> (SELECT v FROM query_vector) LIMIT $5"
    return f"""
        WITH {text_lists},
        query_vector AS (SELECT $8::text::vector AS v),
        vector_hits AS (
            SELECT nearest.id, row_number() OVER (ORDER BY nearest.distance, nearest.id) AS position FROM (
                SELECT d.id, d.distance FROM (
                    SELECT c.id, c.embedding <=> (SELECT v FROM query_vector) AS distance
                    FROM knowledge_chunk c {CHUNK_FILE}
                    WHERE c.vector_store_id = ANY($1::uuid[]) AND c.embedding IS NOT NULL{where}
                    {fence}
                ) d
                ORDER BY d.distance LIMIT $5
            ) nearest
        ),
        fused AS (
            SELECT id, sum(1.0 / ({RRF_K} + position)) AS rrf
            FROM (SELECT id, position FROM vector_hits UNION ALL SELECT id, position FROM text_hits) h
            GROUP BY id
        ),
        scored AS (
            SELECT c.id, c.vector_store_id, c.file_id, c.ordinal, c.text, -fused.rrf AS rank,
                   CASE WHEN c.embedding IS NULL THEN {COVERAGE} ELSE ({COSINE} + {COVERAGE}) / 2 END AS score
            FROM fused JOIN knowledge_chunk c ON c.id = fused.id CROSS JOIN query q
        )
        {RESULTS}
    """
