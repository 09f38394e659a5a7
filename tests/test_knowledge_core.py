"""The knowledge core without HTTP: parsing files, chunking, the simulated embedding, storing chunks,
and search on both retrieval paths.

Full-text search runs on the module's database (the machine's Postgres 15 in CI: no pgvector);
hybrid search on an embedded Postgres with pgvector started for this module
(`support.pgvector`). Both get the same zoo: a file per animal, a passage per topic, and a
visitor guide, with attributes to filter on.
"""

from __future__ import annotations

import io
import math
import os
import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import pydantic
import pypdf
import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from app.db import sqlalchemy_url
from app.errors import InvalidRequest
from app.knowledge import parse
from app.knowledge.chunk import (
    DEFAULT_STRATEGY,
    Chunk,
    ChunkingStrategyParam,
    StaticChunkingStrategy,
    chunk_text,
    chunk_with,
    resolve_strategy,
)
from app.knowledge.db import RetrievalMode, retrieval_mode
from app.knowledge.filters import InvalidFilters, parse_filters
from app.knowledge.search import SearchResult, rewrite_query, search
from app.knowledge.store import FileNotInStore, replace_chunks
from app.upstream.simulated import embedding_vector
from support.documents import pdf
from support.pgvector import pgvector_database

SESSION = {"loop_scope": "session"}
DIMENSIONS = 1536
STRATEGY = pydantic.TypeAdapter[Any](ChunkingStrategyParam)

# --- the zoo ------------------------------------------------------------------------------

ANIMALS = [
    ("lion", "mammal", 4, True),
    ("penguin", "bird", 2, True),
    ("giraffe", "mammal", 4, True),
    ("elephant", "mammal", 4, True),
    ("flamingo", "bird", 2, False),
    ("crocodile", "reptile", 4, False),
    ("tortoise", "reptile", 4, True),
    ("zebra", "mammal", 4, False),
    ("gorilla", "mammal", 2, True),
    ("parrot", "bird", 2, False),
    ("python", "reptile", 0, False),
    ("otter", "mammal", 4, False),
    ("owl", "bird", 2, False),
    ("kangaroo", "mammal", 2, False),
    ("meerkat", "mammal", 4, False),
    ("chameleon", "reptile", 4, False),
    ("pelican", "bird", 2, False),
    ("rhinoceros", "mammal", 4, True),
    ("tapir", "mammal", 4, True),
    ("lemur", "mammal", 4, True),
    ("cheetah", "mammal", 4, True),
    ("hippopotamus", "mammal", 4, True),
    ("iguana", "reptile", 4, False),
    ("toucan", "bird", 2, False),
    ("wolf", "mammal", 4, False),
    ("bison", "mammal", 4, False),
    ("vulture", "bird", 2, True),
    ("okapi", "mammal", 4, True),
    ("panda", "mammal", 4, True),
    ("armadillo", "mammal", 4, False),
]
FOODS = ["fish", "krill", "squid", "herring", "leaves", "grass", "fruit", "insects", "carrots", "bamboo", "hay"]
PLACES = ["savannah", "rainforest", "desert", "wetlands", "mountains", "coast", "riverbanks", "grassland", "islands"]
LANDMARKS = ["north gate", "lake", "playground", "restaurant", "reptile house", "bird hall", "main square", "west lawn"]
KEEPERS = ["Amara", "Ben", "Chloe", "Dmitri", "Esther", "Farid", "Greta", "Hugo", "Ines", "Jonas"]
FILLER = [
    "Visitors often ask about this at the information desk.",
    "The team records every observation in the daily log.",
    "School groups can book a guided talk in advance.",
    "Photographs without flash are welcome.",
    "Our volunteers are happy to answer further questions.",
    "The details may change as the seasons turn.",
]
# Each topic's passage: its own words (eat, sleep, live in, long ... live, enclosure, ...), so one
# passage answers each question, and a filler sentence or two that every topic shares.
TOPICS = {
    "diet": "{Name}s eat {food} and {food2}. Staff feed the {name}s {n} times a day.",
    "sleep": "{Name}s sleep about {n} hours a day, mostly in the {part} of the day.",
    "habitat": "In the wild, {name}s are found in the {place}, where the climate suits them.",
    "lifespan": "How long does a {name} live? A {name} can live {n2} years, a long life for its size.",
    "enclosure": "The {name} enclosure is next to the {landmark}, on the left of the path.",
    "breeding": "{Name}s breed in {season}; a female raises {n} young at a time.",
    "weight": "An adult {name} weighs around {n3} kilograms, males more than females.",
    "keeper": "The keeper responsible for our {name}s is {keeper}, who trained them to stand on the scale.",
    "health": "The vet checks the {name}s' teeth and claws every {n} months.",
    "social": "{Name}s are kept in a group of {n}; they groom and play with each other.",
}
GUIDE = [
    "Tickets for adults cost 24 euros; children under three enter free of charge.",
    "The car park opens at eight in the morning and costs five euros a day.",
    "The cafe by the lake serves soup, sandwiches and ice cream until five.",
    "Wheelchairs can be borrowed at the main entrance free of charge.",
    "Dogs are not allowed in the park, except assistance dogs.",
    "Annual passes pay for themselves after three visits.",
]


@dataclass
class ZooFile:
    file_id: uuid.UUID
    filename: str
    attributes: dict[str, Any]
    passages: list[str]


def zoo() -> list[ZooFile]:
    """A file per animal, a passage per topic; the visitor guide; 330 passages in all."""
    rng = random.Random(15)
    files = []
    for index, (name, kind, legs, endangered) in enumerate(ANIMALS):
        passages = []
        for template in TOPICS.values():
            fact = template.format(
                name=name,
                Name=name.capitalize(),
                food=rng.choice(FOODS),
                food2=rng.choice(FOODS),
                n=rng.randint(2, 9),
                n2=rng.randint(10, 150),
                n3=rng.randint(1, 4000),
                part=rng.choice(["heat", "night", "morning"]),
                place=rng.choice(PLACES),
                landmark=rng.choice(LANDMARKS),
                season=rng.choice(["spring", "summer", "autumn", "winter"]),
                keeper=rng.choice(KEEPERS),
            )
            passages.append(" ".join([fact, *rng.sample(FILLER, 2)]))
        attributes = {"animal": name, "class": kind, "legs": legs, "endangered": endangered, "since": 1990 + index}
        files.append(ZooFile(uuid.uuid4(), f"{name}.md", attributes, passages))
    guide = [f"{line} {filler}" for line in GUIDE for filler in FILLER[:5]]
    files.append(ZooFile(uuid.uuid4(), "visitor-guide.html", {"kind": "guide"}, guide))
    return files


@dataclass
class Zoo:
    db: asyncpg.Pool
    mode: RetrievalMode
    store: uuid.UUID
    files: dict[str, ZooFile]

    async def ask(self, question: str, **options: Any) -> list[SearchResult]:
        query = rewrite_query(question)
        embedding = embedding_vector(query, DIMENSIONS) if self.mode is RetrievalMode.HYBRID else None
        return await search(self.db, [self.store], query, embedding, mode=self.mode, **options)

    def passage(self, animal: str, topic: str) -> str:
        return self.files[animal].passages[list(TOPICS).index(topic)]


async def add_store(db: asyncpg.Pool | asyncpg.Connection) -> uuid.UUID:
    store = uuid.uuid4()
    await db.execute(
        "INSERT INTO vector_store (id, user_id, embedding_model, chunking_strategy) VALUES ($1, 'zoo', 'sim', $2)",
        store,
        DEFAULT_STRATEGY.model_dump_json(),
    )
    return store


async def add_file(
    db: asyncpg.Pool | asyncpg.Connection, store: uuid.UUID, file_id: uuid.UUID, filename: str, attributes: Any
) -> None:
    await db.execute(
        "INSERT INTO file (id, user_id, purpose, filename, bytes, content_type, storage_key, sha256)"
        " VALUES ($1, 'zoo', 'assistants', $2, 1, 'text/markdown', $3, 'x')",
        file_id,
        filename,
        f"files/{file_id}",
    )
    await db.execute(
        "INSERT INTO vector_store_file (vector_store_id, file_id, user_id, status, chunking_strategy, attributes)"
        " VALUES ($1, $2, 'zoo', 'completed', $3, $4)",
        store,
        file_id,
        DEFAULT_STRATEGY.model_dump_json(),
        orjson.dumps(attributes).decode(),
    )


def embeddings(texts: Sequence[str]) -> list[list[float]]:
    return [embedding_vector(text, DIMENSIONS) for text in texts]


async def seeded_zoo(db: asyncpg.Pool, mode: RetrievalMode) -> Zoo:
    store = await add_store(db)
    files = zoo()
    for file in files:
        await add_file(db, store, file.file_id, file.filename, file.attributes)
        chunks = [one_chunk(text) for text in file.passages]
        vectors = embeddings(file.passages) if mode is RetrievalMode.HYBRID else None
        await replace_chunks(
            db, vector_store_id=store, file_id=file.file_id, chunks=chunks, embeddings=vectors, mode=mode
        )
    return Zoo(db, mode, store, {file.attributes.get("animal", "guide"): file for file in files})


def one_chunk(text: str) -> Chunk:
    [chunk] = chunk_text(text, 200, 0)  # a passage is a chunk
    return chunk


@pytest_asyncio.fixture(scope="module", **SESSION)
async def vector_db() -> AsyncIterator[asyncpg.Pool]:
    """A database with pgvector (its own embedded server, whatever TEST_DATABASE_URL is)."""
    async with pgvector_database() as url:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        yield pool
        await pool.close()


@pytest_asyncio.fixture(scope="module", **SESSION)
async def full_text_zoo(db: asyncpg.Pool) -> Zoo:
    return await seeded_zoo(db, RetrievalMode.FULL_TEXT)


@pytest_asyncio.fixture(scope="module", **SESSION)
async def hybrid_zoo(vector_db: asyncpg.Pool) -> Zoo:
    assert await retrieval_mode(vector_db) is RetrievalMode.HYBRID
    return await seeded_zoo(vector_db, RetrievalMode.HYBRID)


@pytest.fixture(params=["full_text", "hybrid"])
def any_zoo(request: pytest.FixtureRequest, full_text_zoo: Zoo, hybrid_zoo: Zoo) -> Zoo:
    """Each search test runs on both paths."""
    return full_text_zoo if request.param == "full_text" else hybrid_zoo


# --- parsing -------------------------------------------------------------------------------


CARE_SHEET = [
    ["Penguin care sheet", "Feed herring twice a day.", "Check the pool water daily."],
    ["Breeding season", "Nest boxes go out in March."],
]


def encrypted(data: bytes, user_password: str) -> bytes:
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=user_password, owner_password="keeper")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


async def test_a_pdf_gives_its_pages_text_in_order() -> None:
    text = await parse.extract_text_async(pdf(CARE_SHEET), "application/pdf")
    assert text == (
        "Penguin care sheet\nFeed herring twice a day.\nCheck the pool water daily.\n\nBreeding season\n"
        "Nest boxes go out in March."
    )
    # Encrypted for its owner only: an empty password opens it, as any PDF reader does.
    assert parse.extract_text(encrypted(pdf(CARE_SHEET), ""), "application/pdf") == text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (encrypted(pdf(CARE_SHEET), "secret"), "The PDF is protected by a password."),
        (b"%PDF-1.4\nnothing else", "The PDF cannot be read"),
        (pdf(CARE_SHEET)[:300], "The PDF cannot be read"),
        (b"", "The PDF cannot be read"),
        (pdf([[], []]), "The file contains no text to search."),
    ],
    ids=["password", "garbage", "truncated", "empty", "no-text"],
)
def test_an_unreadable_pdf_is_an_invalid_file(data: bytes, message: str) -> None:
    with pytest.raises(parse.UnreadableFile) as failed:
        parse.extract_text(data, "application/pdf")
    assert failed.value.last_error["code"] == "invalid_file"
    assert failed.value.last_error["message"].startswith(message)


def test_html_keeps_what_a_reader_sees_with_its_paragraphs_and_lines() -> None:
    markup = b"""<!doctype html><html><head><title>Lions</title><style>p { color: red }</style>
        <script>var hidden = "<p>not text</p>";</script></head>
        <body><h1>Lion  facts</h1><p>Lions sleep
        up to 20 hours.<br>They hunt at night.</p>
        <ul><li>Diet: meat</li><li>Pride: 3 &amp; more</li></ul><template><p>later</p></template>
        <table><tr><td>Weight</td><td>190 kg</td></tr></table></body></html>"""
    text = parse.extract_text(markup, "text/html; charset=utf-8")
    assert text == (
        "Lions\n\nLion facts\n\nLions sleep up to 20 hours.\nThey hunt at night.\n\nDiet: meat\nPride: 3 & more"
        "\n\nWeight 190 kg"
    )


def test_markdown_and_plain_text_are_read_as_text() -> None:
    markdown = "# Otters\r\n\r\n\r\n\r\nOtters *hold hands* while they sleep.\x00\n"
    assert parse.extract_text(markdown.encode(), "text/markdown") == "# Otters\n\nOtters *hold hands* while they sleep."
    assert parse.extract_text("Café crème".encode("cp1252"), "text/plain") == "Café crème"  # not UTF-8
    assert parse.extract_text("Zoo".encode("utf-16"), "text/plain") == "Zoo"
    assert parse.extract_text("Zoo".encode("latin-1"), "text/plain; charset=latin-1") == "Zoo"


def test_other_types_and_empty_files_are_refused_with_the_code_the_file_records() -> None:
    with pytest.raises(parse.UnreadableFile) as unsupported:
        parse.extract_text(b"\x89PNG", "image/png")
    assert unsupported.value.last_error == {
        "code": "unsupported_file",
        "message": "Files of type 'image/png' cannot be searched.",
    }
    with pytest.raises(parse.UnreadableFile) as empty:
        parse.extract_text(b" \n\t ", "text/plain")
    assert empty.value.code == "invalid_file"


# --- chunking ------------------------------------------------------------------------------


def essay(paragraphs: int, seed: int = 7) -> str:
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(1, 11))) for _ in range(3000)]
    sentences = [
        " ".join(rng.choices(vocabulary, k=rng.randint(4, 24))).capitalize() + "." for _ in range(6 * paragraphs)
    ]
    return "\n\n".join(" ".join(sentences[at : at + 6]) for at in range(0, len(sentences), 6))


def spans_of(text: str, chunks: Sequence[Any]) -> list[tuple[int, int]]:
    spans = []
    at = 0
    for chunk in chunks:
        start = text.index(chunk.text, at)
        spans.append((start, start + len(chunk.text)))
        at = start + 1
    return spans


@pytest.mark.parametrize(("max_tokens", "overlap"), [(800, 400), (100, 50), (100, 0), (4096, 2048), (333, 100)])
def test_chunks_fit_overlap_and_never_split_a_word(max_tokens: int, overlap: int) -> None:
    text = essay(120)
    chunks = chunk_text(text, max_tokens, overlap)
    assert len(chunks) > 1
    spans = spans_of(text, chunks)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)  # nothing left out
    for chunk, (start, end), following in zip(chunks, spans, [*spans[1:], None], strict=True):
        assert chunk.tokens == math.ceil(len(chunk.text) / 4) <= max_tokens
        assert chunk.tokens >= max_tokens // 2 or following is None  # no crumbs
        assert (start == 0 or text[start - 1].isspace()) and (end == len(text) or text[end].isspace())
        if following is not None:
            shared = max(0, end - following[0])
            assert shared <= overlap * 4
            assert following[0] <= end + 2  # the next chunk starts where this one ends, or before
            if overlap:
                assert shared >= overlap * 4 / 2 - 12  # at least half the overlap (less a word)
    # The default strategy cuts at sentence ends.
    assert all(chunk.text.endswith(".") for chunk in chunk_with(text, DEFAULT_STRATEGY))


def test_a_word_longer_than_a_chunk_is_the_only_thing_ever_cut() -> None:
    blob = "x" * 1000
    chunks = chunk_text(f"see {blob} here", 100, 0)
    assert [chunk.text for chunk in chunks] == ["see", "x" * 400, "x" * 400, "x" * 200 + " here"]
    assert [chunk.tokens for chunk in chunks] == [1, 100, 100, 52]
    assert chunk_text(" \n ", 100, 0) == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"type": "auto"}, (800, 400)),
        ({"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 50}}, (100, 50)),
        ({"type": "static", "static": {"max_chunk_size_tokens": 4096, "chunk_overlap_tokens": 0}}, (4096, 0)),
        ({"type": "static", "static": {"max_chunk_size_tokens": 99, "chunk_overlap_tokens": 0}}, None),
        ({"type": "static", "static": {"max_chunk_size_tokens": 4097, "chunk_overlap_tokens": 0}}, None),
        ({"type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 401}}, None),
        ({"type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": -1}}, None),
        ({"type": "static", "static": {"max_chunk_size_tokens": 800}}, None),
        ({"type": "static", "static": {"max_chunk_size_tokens": "800", "chunk_overlap_tokens": 400}}, None),
        ({"type": "static"}, None),
        ({"type": "auto", "static": {}}, None),
        ({"type": "other"}, None),
    ],
)
def test_a_chunking_strategy_is_validated_as_openai_does(body: Any, expected: tuple[int, int] | None) -> None:
    if expected is None:
        with pytest.raises(pydantic.ValidationError):
            STRATEGY.validate_python(body)
        return
    resolved = resolve_strategy(STRATEGY.validate_python(body))
    assert isinstance(resolved, StaticChunkingStrategy)
    assert (resolved.static.max_chunk_size_tokens, resolved.static.chunk_overlap_tokens) == expected
    assert resolve_strategy(None).model_dump() == {
        "type": "static",
        "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400},
    }
    with pytest.raises(ValueError):
        chunk_text("text", 800, 401)


# --- the simulated embedding ---------------------------------------------------------------


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_the_simulated_embedding_knows_paraphrases_from_other_topics() -> None:
    question = embedding_vector("How many hours do lions sleep?", DIMENSIONS)
    answer = embedding_vector("A lion sleeps up to twenty hours a day, mostly in the heat.", DIMENSIONS)
    same_animal = embedding_vector("Lions eat meat. Staff feed the lions 3 times a day.", DIMENSIONS)
    unrelated = embedding_vector("Annual passes pay for themselves after three visits.", DIMENSIONS)
    assert math.isclose(math.fsum(x * x for x in question), 1.0, rel_tol=1e-9)
    assert cosine(question, answer) > 0.4 > cosine(question, same_animal) > 0.1 > abs(cosine(question, unrelated))
    # Token ids are words too; an empty text still has a direction.
    assert cosine(embedding_vector([1, 2, 3], 64), embedding_vector([1, 2, 4], 64)) > 0.3
    assert math.isclose(math.fsum(x * x for x in embedding_vector("", 8)), 1.0)


def test_the_simulated_embedding_is_the_same_in_every_process() -> None:
    text = "Penguins eat herring"
    code = f"from app.upstream.simulated import embedding_vector; print(embedding_vector({text!r}, 32))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert outputs == {f"{embedding_vector(text, 32)}\n"}


# --- storing -------------------------------------------------------------------------------

COUNT_CHUNKS = "SELECT count(*) FROM knowledge_chunk WHERE vector_store_id = $1"


class RolledBack(Exception):
    pass


@pytest.mark.parametrize("path", ["full_text", "hybrid"])
async def test_indexing_a_file_again_replaces_its_chunks(path: str, db: asyncpg.Pool, vector_db: asyncpg.Pool) -> None:
    pool = vector_db if path == "hybrid" else db
    mode = await retrieval_mode(pool)
    store, file_id = await add_store(pool), uuid.uuid4()
    await add_file(pool, store, file_id, "care-sheet.pdf", {})
    text = parse.extract_text(pdf(CARE_SHEET * 40), "application/pdf")
    chunks = chunk_text(text, 100, 50)
    for _ in range(2):  # a retry after a crash, or a re-index
        written = await replace_chunks(
            pool,
            vector_store_id=store,
            file_id=file_id,
            chunks=chunks,
            embeddings=embeddings([c.text for c in chunks]),
            mode=mode,
        )
        assert written == len(chunks) > 10
    rows = await pool.fetch(
        "SELECT ordinal, text, tokens FROM knowledge_chunk WHERE vector_store_id = $1 ORDER BY ordinal", store
    )
    assert [(row["ordinal"], row["text"], row["tokens"]) for row in rows] == [
        (ordinal, chunk.text, chunk.tokens) for ordinal, chunk in enumerate(chunks)
    ]
    if mode is RetrievalMode.HYBRID:
        assert await pool.fetchval(
            "SELECT count(embedding) FROM knowledge_chunk WHERE vector_store_id = $1", store
        ) == len(chunks)
    # In a caller's transaction, the caller's to commit or roll back.
    with pytest.raises(RolledBack):
        async with pool.acquire() as connection, connection.transaction():
            await replace_chunks(
                connection, vector_store_id=store, file_id=file_id, chunks=chunks[:1], embeddings=None, mode=mode
            )
            assert await connection.fetchval(COUNT_CHUNKS, store) == 1
            raise RolledBack
    assert await pool.fetchval(COUNT_CHUNKS, store) == len(chunks)
    [result] = await search(
        pool,
        [store],
        "nest boxes March",
        embedding_vector("nest boxes March", DIMENSIONS),
        mode=mode,
        max_num_results=1,
    )
    assert "Nest boxes go out in March." in result.text and result.filename == "care-sheet.pdf"
    assert await search(pool, [await add_store(pool)], "nest boxes March", None, mode=mode) == []  # another store
    with pytest.raises(FileNotInStore):
        await replace_chunks(
            pool, vector_store_id=store, file_id=uuid.uuid4(), chunks=chunks, embeddings=None, mode=mode
        )


async def test_a_session_writes_and_searches_in_its_own_transaction(database_url: str, db: asyncpg.Pool) -> None:
    """What a route does: the session's connection and transaction, committed or rolled back by it."""
    engine = create_async_engine(sqlalchemy_url(database_url))
    try:
        store, file_id = await add_store(db), uuid.uuid4()
        await add_file(db, store, file_id, "notes.txt", {"kind": "notes"})
        chunks = chunk_text("Otters hold hands while they sleep so that they do not drift apart.")
        filters = parse_filters({"type": "eq", "key": "kind", "value": "notes"})
        async with AsyncSession(engine) as session, session.begin():
            mode = await retrieval_mode(session)
            await replace_chunks(
                session, vector_store_id=store, file_id=file_id, chunks=chunks, embeddings=None, mode=mode
            )
            [found] = await search(session, [store], "otters sleep", None, mode=mode, filters=filters)
            assert (found.text, found.attributes, found.score) == (chunks[0].text, {"kind": "notes"}, 1.0)
            await session.rollback()
        assert await db.fetchval(COUNT_CHUNKS, store) == 0
    finally:
        await engine.dispose()


async def test_the_retrieval_mode_says_whether_the_database_has_pgvector(
    db: asyncpg.Pool, vector_db: asyncpg.Pool
) -> None:
    has_pgvector = await db.fetchval("SELECT count(*) > 0 FROM pg_extension WHERE extname = 'vector'")
    assert await retrieval_mode(db) is (RetrievalMode.HYBRID if has_pgvector else RetrievalMode.FULL_TEXT)
    assert await retrieval_mode(vector_db) is RetrievalMode.HYBRID
    assert RetrievalMode.FULL_TEXT.description.startswith("full_text: pgvector is not available")


# --- search --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "animal", "topic"),
    [
        ("What do penguins eat?", "penguin", "diet"),
        ("How long does a tortoise live?", "tortoise", "lifespan"),
        ("Where is the otter enclosure?", "otter", "enclosure"),
        ("Who is the keeper of the gorillas?", "gorilla", "keeper"),
        ("how many hours do lions sleep", "lion", "sleep"),
        ("When do flamingos breed?", "flamingo", "breeding"),
    ],
)
async def test_the_passage_that_answers_a_question_ranks_first(
    any_zoo: Zoo, question: str, animal: str, topic: str
) -> None:
    results = await any_zoo.ask(question)
    assert results[0].text == any_zoo.passage(animal, topic)
    best = results[0]
    assert (best.filename, best.file_id, best.vector_store_id) == (
        f"{animal}.md",
        any_zoo.files[animal].file_id,
        any_zoo.store,
    )
    assert best.attributes == any_zoo.files[animal].attributes and best.ordinal == list(TOPICS).index(topic)
    assert all(0.0 <= result.score <= 1.0 for result in results)
    assert len({result.chunk_id for result in results}) == len(results) == 10


async def test_a_visitor_question_finds_the_guide(any_zoo: Zoo) -> None:
    [best, *_] = await any_zoo.ask("How much are tickets for children?")
    assert best.filename == "visitor-guide.html" and best.text.startswith("Tickets for adults cost 24 euros")


MISSPELT = [
    ("What do pinguins eat?", "penguin", "diet"),
    ("How long does a tortiose live?", "tortoise", "lifespan"),
    ("Who is the keeper of the gorilas?", "gorilla", "keeper"),
    ("When do flammingos breed?", "flamingo", "breeding"),
    ("what do elefants eat", "elephant", "diet"),
]


async def test_hybrid_search_finds_misspelt_names_through_the_embedding(hybrid_zoo: Zoo) -> None:
    """Full-text search knows only the words it was given; the embedding's 3-grams know `tortiose`."""
    words_only = Zoo(hybrid_zoo.db, RetrievalMode.FULL_TEXT, hybrid_zoo.store, hybrid_zoo.files)
    ranks = {"hybrid": 0, "full_text": 0}
    for question, animal, topic in MISSPELT:
        for zoo in (hybrid_zoo, words_only):
            texts = [result.text for result in await zoo.ask(question, max_num_results=50)]
            rank = texts.index(zoo.passage(animal, topic)) if zoo.passage(animal, topic) in texts else 50
            ranks[zoo.mode] += rank
            if zoo is hybrid_zoo:
                assert rank < 3, question
    assert ranks["hybrid"] < ranks["full_text"]


async def test_hybrid_search_through_the_hnsw_index_ranks_alike(
    hybrid_zoo: Zoo, monkeypatch: pytest.MonkeyPatch
) -> None:
    exact = await hybrid_zoo.ask("What do penguins eat?")
    monkeypatch.setattr("app.knowledge.search.EXACT_SCAN_MAX_CHUNKS", 0)  # the index, as for a large store
    indexed = await hybrid_zoo.ask("What do penguins eat?")
    assert indexed[0] == exact[0]


async def test_hybrid_search_without_a_query_embedding_falls_back_to_words(hybrid_zoo: Zoo) -> None:
    results = await search(hybrid_zoo.db, [hybrid_zoo.store], "penguins eat", None, mode=RetrievalMode.HYBRID)
    assert results[0].text == hybrid_zoo.passage("penguin", "diet") and results[0].score == 1.0


@pytest.mark.parametrize("limit", [1, 7, 50])
async def test_max_num_results_is_honoured(any_zoo: Zoo, limit: int) -> None:
    results = await any_zoo.ask("Keepers feed the animals every day", max_num_results=limit)
    assert len(results) == limit


async def test_a_score_threshold_keeps_only_the_closer_matches(any_zoo: Zoo) -> None:
    everything = await any_zoo.ask("What do penguins eat?", max_num_results=50)
    threshold = everything[0].score
    narrowed = await any_zoo.ask("What do penguins eat?", max_num_results=50, score_threshold=threshold)
    assert narrowed[0] == everything[0] and all(result.score >= threshold for result in narrowed)
    assert len(narrowed) < len(everything)
    # A question about nothing in the store: whatever is nearest scores low.
    assert await any_zoo.ask("quantum chromodynamics on a lattice", score_threshold=0.3) == []


def matches(node: dict[str, Any], attributes: dict[str, Any]) -> bool:
    """What a filter means, in Python, to check the SQL against."""
    if node["type"] in ("and", "or"):
        found = [matches(child, attributes) for child in node["filters"]]
        return all(found) if node["type"] == "and" else any(found)
    key, value, kind = node["key"], node["value"], node["type"]
    present = key in attributes
    actual = attributes.get(key)
    if kind == "eq":
        return present and actual == value
    if kind == "ne":
        return not present or actual != value
    if kind == "in":
        return present and actual in value
    if kind == "nin":
        return not present or actual not in value
    if not present or isinstance(actual, bool) or isinstance(actual, str) != isinstance(value, str):
        return False  # ordered only against a value of its own type
    return bool({"gt": actual > value, "gte": actual >= value, "lt": actual < value, "lte": actual <= value}[kind])


FILTERS = [
    {"type": "eq", "key": "class", "value": "bird"},
    {"type": "eq", "key": "endangered", "value": True},
    {"type": "ne", "key": "class", "value": "mammal"},  # the guide has no class: it is not a mammal
    {"type": "gt", "key": "animal", "value": "p"},
    {"type": "lte", "key": "since", "value": 2000},
    {"type": "in", "key": "animal", "value": ["penguin", "owl", "lion"]},
    {"type": "nin", "key": "class", "value": ["mammal", "bird"]},
    {
        "type": "and",
        "filters": [
            {"type": "in", "key": "class", "value": ["reptile", "bird"]},
            {"type": "gte", "key": "legs", "value": 4},
        ],
    },
    {
        "type": "or",
        "filters": [
            {"type": "eq", "key": "kind", "value": "guide"},
            {
                "type": "and",
                "filters": [{"type": "eq", "key": "legs", "value": 0}, {"type": "lt", "key": "since", "value": 3000.5}],
            },
        ],
    },
]


@pytest.mark.parametrize("raw", FILTERS, ids=[orjson.dumps(raw).decode()[:60] for raw in FILTERS])
async def test_filters_narrow_results_to_the_files_whose_attributes_match(any_zoo: Zoo, raw: dict[str, Any]) -> None:
    filters = parse_filters(raw)
    results = await any_zoo.ask("Keepers feed the animals every day, tickets", max_num_results=50, filters=filters)
    files = {result.filename for result in results}
    expected = {file.filename for file in any_zoo.files.values() if matches(raw, file.attributes)}
    assert files and files <= expected
    assert all(matches(raw, result.attributes) for result in results)
    everything = await any_zoo.ask("Keepers feed the animals every day, tickets", max_num_results=50)
    assert {result.filename for result in everything} - expected  # the filter did remove some


async def test_a_filter_on_one_animal_answers_from_its_file(any_zoo: Zoo) -> None:
    filters = parse_filters({"type": "eq", "key": "animal", "value": "penguin"})
    results = await any_zoo.ask("What do they eat?", filters=filters)
    assert results[0].text == any_zoo.passage("penguin", "diet")
    assert {result.filename for result in results} == {"penguin.md"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"type": "like", "key": "a", "value": "b"}, "Invalid 'filters'"),
        ({"type": "eq", "key": "a"}, "Invalid 'filters.eq.value'"),
        ({"type": "eq", "key": "a", "value": {"b": 1}}, "Invalid 'filters.eq.value"),
        ({"type": "eq", "key": "", "value": 1}, "Invalid 'filters.eq.key'"),
        ({"type": "and", "filters": []}, "Invalid 'filters.and.filters'"),
        ({"type": "or", "filters": [{"type": "eq", "key": "a"}]}, "Invalid 'filters.or.filters[0].eq.value'"),
        ({"type": "gt", "key": "a", "value": True}, "A 'gt' filter on 'a' compares numbers or strings"),
        ({"type": "in", "key": "a", "value": "b"}, "The value of an 'in' filter on 'a' must be a non-empty list"),
        ({"type": "eq", "key": "a", "value": ["b"]}, "The value of an 'eq' filter on 'a' must be a string"),
        ({"type": "eq", "key": "a", "value": 1, "extra": 2}, "Invalid 'filters.eq.extra'"),
        ("class = bird", "Invalid 'filters'"),
    ],
)
def test_a_filter_that_is_not_openais_is_a_400_naming_filters(raw: Any, message: str) -> None:
    with pytest.raises(InvalidFilters) as failed:
        parse_filters(raw)
    assert failed.value.status_code == 400 and failed.value.param == "filters"
    assert failed.value.message.startswith(message), failed.value.message


def test_filters_nest_and_grow_only_so_far() -> None:
    deep: dict[str, Any] = {"type": "eq", "key": "a", "value": 1}
    for _ in range(5):
        deep = {"type": "and", "filters": [deep]}
    with pytest.raises(InvalidFilters, match="nest at most 5"):
        parse_filters(deep)
    wide = {"type": "or", "filters": [{"type": "eq", "key": "a", "value": n} for n in range(51)]}
    with pytest.raises(InvalidFilters, match="at most 50 comparisons"):
        parse_filters(wide)
    assert parse_filters(None) is None


async def test_out_of_range_limits_are_refused_by_name(full_text_zoo: Zoo) -> None:
    for options, param in [
        ({"max_num_results": 0}, "max_num_results"),
        ({"max_num_results": 51}, "max_num_results"),
        ({"score_threshold": 1.5}, "ranking_options.score_threshold"),
    ]:
        with pytest.raises(InvalidRequest) as failed:
            await full_text_zoo.ask("penguins", **options)
        assert failed.value.param == param


@pytest.mark.parametrize(
    ("question", "rewritten"),
    [
        ("What do penguins eat?", "penguins eat"),
        ("How much are tickets for children?", "tickets children"),
        ("I'd like to know the height of the main office building", "height of main office building"),
        ("What?", "What?"),
    ],
)
def test_rewrite_query_keeps_what_the_question_is_about(question: str, rewritten: str) -> None:
    assert rewrite_query(question) == rewritten
