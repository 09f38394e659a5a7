"""The knowledge core on both retrieval paths: indexing rate, then search latency and top-1 accuracy.

    .venv/bin/python bench/knowledge_core.py [--passages 1000] [--queries 100] [--scale 0]

Full text runs on `BENCH_DATABASE_URL` or `TEST_DATABASE_URL` when set, else
postgresql://postgres@127.0.0.1:5432/test, in a scratch database (`gateway_bench_knowledge_<pid>`,
migrated with Alembic, dropped at the end); hybrid on an embedded Postgres with pgvector of its
own (tests/support/pgvector.py), whatever that server is.

Indexing: `--passages` passages of a made-up zoo (ten topics for each of `--passages / 10`
species, 450-780 characters each) in files of ten, each file as the indexer will treat it: text
extracted, chunked (static, at most 200 tokens without overlap: a passage a chunk), every chunk embedded with
the simulated embedding (1536 dimensions, the cost of an offline indexer; with a real upstream
the embedding call replaces it), and written with `replace_chunks`. Then VACUUM ANALYZE.
Printed: chunks per second, and the share of the time spent embedding.

Search: `--queries` questions, each about one passage ("What do borakans eat?"), rewritten,
embedded (hybrid) and searched with max_num_results 10; p50 and p99 of `search` alone, and how
often the passage that answers ranks first. The hybrid path is timed as it chooses (an exact scan
for stores this small) and forced through the HNSW index, and each path once more with a filter.
`--scale N,M` adds stores of N and M passages to the hybrid database and times the exact scan and
the index on each, to see where EXACT_SCAN_MAX_CHUNKS should lie.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from app import migrations  # noqa: E402
from app.knowledge import search as search_module  # noqa: E402
from app.knowledge.chunk import DEFAULT_STRATEGY, StaticChunking, StaticChunkingStrategy, chunk_with  # noqa: E402
from app.knowledge.db import RetrievalMode, retrieval_mode  # noqa: E402
from app.knowledge.filters import parse_filters  # noqa: E402
from app.knowledge.parse import extract_text  # noqa: E402
from app.knowledge.search import rewrite_query, search  # noqa: E402
from app.knowledge.store import replace_chunks  # noqa: E402
from app.upstream.simulated import embedding_vector  # noqa: E402
from support.database import with_database  # noqa: E402
from support.pgvector import pgvector_database  # noqa: E402

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
DIMENSIONS = 1536
# Passages of 450-780 characters: chunks of at most 200 tokens (800) end at their paragraph, a passage each.
STRATEGY = StaticChunkingStrategy(
    type="static", static=StaticChunking(max_chunk_size_tokens=200, chunk_overlap_tokens=0)
)
SYLLABLES = [
    "ba",
    "ko",
    "ra",
    "ti",
    "lu",
    "me",
    "sa",
    "vo",
    "ne",
    "gu",
    "pi",
    "da",
    "fe",
    "zo",
    "mi",
    "ta",
    "ru",
    "no",
    "ke",
    "ja",
]
TOPICS = {
    "diet": ("{Name}s eat {a} and {b}; staff feed the {name}s {n} times a day.", "What do {name}s eat?"),
    "sleep": ("{Name}s sleep about {n} hours, mostly in the {part}.", "How many hours do {name}s sleep?"),
    "habitat": ("In the wild, {name}s are found in the {place}.", "Where do wild {name}s come from?"),
    "lifespan": ("A {name} can live {n} decades, a long life for its size.", "How long does a {name} live?"),
    "enclosure": ("The {name} enclosure is next to the {place} house.", "Where is the {name} enclosure?"),
    "breeding": ("{Name}s breed in {season}; a female raises {n} young.", "When do {name}s breed?"),
    "weight": ("An adult {name} weighs around {n}0 kilograms.", "How heavy is an adult {name}?"),
    "keeper": ("The keeper responsible for our {name}s is {keeper}.", "Who is the keeper of the {name}s?"),
    "health": ("The vet checks the {name}s' teeth every {n} months.", "How often does the vet check the {name}s?"),
    "social": ("{Name}s are kept in a group of {n} and groom each other.", "How big is the {name} group?"),
}
WORDS = ["fish", "krill", "leaves", "grass", "fruit", "insects", "bamboo", "hay", "seeds", "nuts"]
PLACES = ["savannah", "rainforest", "desert", "wetlands", "mountains", "coast", "riverbank", "grassland", "islands"]
KEEPERS = ["Amara", "Ben", "Chloe", "Dmitri", "Esther", "Farid", "Greta", "Hugo", "Ines", "Jonas"]
# Said of every animal: sentences that share no word with a question.
FILLER = [
    "Visitors ask about this at the information desk, and the answer changes little from year to year.",
    "The team records every observation in the daily log so that the next shift knows what happened.",
    "School parties can book a guided talk in advance; the talks last about twenty minutes.",
    "Photographs without flash are welcome, though the animals may hide when the paths are crowded.",
    "Our volunteers are happy to answer further questions about the animals and their care.",
    "The details may change as the seasons turn, and the signs by the paths are updated then.",
    "Children can collect a stamp for their zoo passport at the kiosk nearby.",
    "A map of the zoo shows the shortest way there from either entrance.",
]


@dataclass
class Passage:
    species: str
    topic: str
    text: str
    question: str


@dataclass
class Corpus:
    files: list[tuple[uuid.UUID, str, dict[str, Any], str]] = field(default_factory=list)
    passages: list[Passage] = field(default_factory=list)


def corpus(passages: int, seed: int = 15) -> Corpus:
    rng = random.Random(seed)
    made = Corpus()
    names: set[str] = set()
    while len(names) < max(1, passages // len(TOPICS)):
        names.add("".join(rng.choices(SYLLABLES, k=3)) + "n")  # English plurals: `bakoran`, `bakorans`
    for index, name in enumerate(sorted(names)):
        paragraphs = []
        for topic, (template, question) in TOPICS.items():
            fact = template.format(
                name=name,
                Name=name.capitalize(),
                a=rng.choice(WORDS),
                b=rng.choice(WORDS),
                n=rng.randint(2, 9),
                part=rng.choice(["heat", "night", "morning"]),
                place=rng.choice(PLACES),
                season=rng.choice(["spring", "summer", "autumn", "winter"]),
                keeper=rng.choice(KEEPERS),
            )
            sentences = [fact]
            for sentence in rng.sample(FILLER, len(FILLER)):  # to 450-780 characters: a chunk each
                if len(" ".join(sentences)) >= 450:
                    break
                sentences.append(sentence)
            text = " ".join(sentences)
            paragraphs.append(text)
            made.passages.append(Passage(name, topic, text, question.format(name=name)))
        attributes = {"species": name, "group": index % 5}
        made.files.append((uuid.uuid4(), f"{name}.txt", attributes, "\n\n".join(paragraphs)))
    return made


async def add_store(conn: asyncpg.Connection) -> uuid.UUID:
    store = uuid.uuid4()
    await conn.execute(
        "INSERT INTO vector_store (id, user_id, embedding_model, chunking_strategy) VALUES ($1, 'bench', 'sim', $2)",
        store,
        DEFAULT_STRATEGY.model_dump_json(),
    )
    return store


async def index(conn: asyncpg.Connection, mode: RetrievalMode, made: Corpus) -> tuple[uuid.UUID, dict[str, float]]:
    """Index every file of `made` into a new store as the indexer would; the rates."""
    store = await add_store(conn)
    for file_id, filename, attributes, _ in made.files:
        await conn.execute(
            "INSERT INTO file (id, user_id, purpose, filename, bytes, content_type, storage_key, sha256)"
            " VALUES ($1, 'bench', 'assistants', $2, 1, 'text/plain', $3, 'x')",
            file_id,
            filename,
            f"files/{file_id}",
        )
        await conn.execute(
            "INSERT INTO vector_store_file (vector_store_id, file_id, user_id, status, chunking_strategy, attributes)"
            " VALUES ($1, $2, 'bench', 'in_progress', $3, $4)",
            store,
            file_id,
            DEFAULT_STRATEGY.model_dump_json(),
            orjson.dumps(attributes).decode(),
        )
    chunks = embedding = 0.0
    started = time.perf_counter()
    for file_id, _, _, text in made.files:
        pieces = chunk_with(extract_text(text.encode(), "text/plain"), STRATEGY)
        before = time.perf_counter()
        vectors = (
            [embedding_vector(piece.text, DIMENSIONS) for piece in pieces] if mode is RetrievalMode.HYBRID else None
        )
        embedding += time.perf_counter() - before
        await replace_chunks(conn, vector_store_id=store, file_id=file_id, chunks=pieces, embeddings=vectors, mode=mode)
        chunks += len(pieces)
    elapsed = time.perf_counter() - started
    await conn.execute("VACUUM ANALYZE knowledge_chunk")
    return store, {
        "chunks": chunks,
        "chunks/s": chunks / elapsed,
        "embedding share": embedding / elapsed,
        "seconds": elapsed,
    }


async def timed_searches(
    run: Callable[[Passage], Awaitable[list[search_module.SearchResult]]], questions: list[Passage]
) -> dict[str, float]:
    for passage in questions[:5]:
        await run(passage)  # warm-up: plans, caches
    samples, first = [], 0
    for passage in questions:
        started = time.perf_counter()
        results = await run(passage)
        samples.append((time.perf_counter() - started) * 1000)
        first += bool(results) and passage.text in results[0].text
    samples.sort()
    p99 = statistics.quantiles(samples, n=100, method="inclusive")[98] if len(samples) > 1 else samples[0]
    return {"p50 ms": statistics.median(samples), "p99 ms": p99, "top-1": first / len(questions)}


def searcher(
    conn: asyncpg.Connection, store: uuid.UUID, mode: RetrievalMode, filtered: bool = False
) -> Callable[[Passage], Awaitable[list[search_module.SearchResult]]]:
    async def run(passage: Passage) -> list[search_module.SearchResult]:
        query = rewrite_query(passage.question)
        vector = embedding_vector(query, DIMENSIONS) if mode is RetrievalMode.HYBRID else None
        filters = parse_filters({"type": "eq", "key": "species", "value": passage.species}) if filtered else None
        return await search(conn, [store], query, vector, mode=mode, max_num_results=10, filters=filters)

    return run


async def measure(url: str, label: str, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(url)
    try:
        mode = await retrieval_mode(conn)
        made = corpus(args.passages)
        store, rates = await index(conn, mode, made)
        print(f"\n{label}: {mode.description}")
        print(
            f"  indexing: {len(made.passages)} passages, {rates['chunks']:.0f} chunks in {rates['seconds']:.2f} s:"
            f" {rates['chunks/s']:.0f} chunks/s, {rates['embedding share']:.0%} of it embedding"
        )
        questions = random.Random(1).sample(made.passages, min(args.queries, len(made.passages)))
        variants: list[tuple[str, Callable[[], Any]]] = [("search", lambda: None)]
        if mode is RetrievalMode.HYBRID:
            variants.append(("search via HNSW", lambda: setattr(search_module, "EXACT_SCAN_MAX_CHUNKS", 0)))
        for name, prepare in variants:
            prepare()
            for filtered in (False, True):
                result = await timed_searches(searcher(conn, store, mode, filtered), questions)
                print(
                    f"  {name}{' + filter' if filtered else ''}: p50 {result['p50 ms']:.1f} ms,"
                    f" p99 {result['p99 ms']:.1f} ms, answer first {result['top-1']:.0%}"
                )
        search_module.EXACT_SCAN_MAX_CHUNKS = EXACT_SCAN_MAX_CHUNKS
        if mode is RetrievalMode.HYBRID:
            for size in filter(None, args.scale.split(",")):
                await scale(conn, mode, int(size), args.queries)
    finally:
        await conn.close()


async def scale(conn: asyncpg.Connection, mode: RetrievalMode, passages: int, queries: int) -> None:
    big = corpus(passages, seed=16)
    store, rates = await index(conn, mode, big)
    questions = random.Random(2).sample(big.passages, min(queries, len(big.passages)))
    print(f"  a store of {rates['chunks']:.0f} chunks (indexed at {rates['chunks/s']:.0f} chunks/s):")
    for name, limit in (("exact scan", 10**9), ("HNSW", 0)):
        search_module.EXACT_SCAN_MAX_CHUNKS = limit
        result = await timed_searches(searcher(conn, store, mode), questions)
        print(
            f"    {name}: p50 {result['p50 ms']:.1f} ms, p99 {result['p99 ms']:.1f} ms,"
            f" answer first {result['top-1']:.0%}"
        )
    search_module.EXACT_SCAN_MAX_CHUNKS = EXACT_SCAN_MAX_CHUNKS


EXACT_SCAN_MAX_CHUNKS = search_module.EXACT_SCAN_MAX_CHUNKS


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--scale", default="", help="passages of larger hybrid stores, comma-separated: 2000,10000")
    args = parser.parse_args()

    server = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL") or DEFAULT_SERVER
    name = f"gateway_bench_knowledge_{os.getpid()}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = with_database(server, name)
        await asyncio.to_thread(migrations.upgrade, url)
        await measure(url, f"Postgres at {server.rsplit('@', 1)[-1]}", args)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    async with pgvector_database() as url:
        await measure(url, "embedded Postgres with pgvector", args)


if __name__ == "__main__":
    asyncio.run(main())
