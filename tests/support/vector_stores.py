"""What the vector store tests share: a zoo of documents whose passages each answer one question, and
more databases with pgvector on one embedded server (starting a server takes seconds; a database does not).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from support.database import create_template, drop, with_database
from support.pgvector import pgvector_database

# Each animal's file: a paragraph per topic, each the one that answers its question.
ZOO = {
    "penguin": [
        "Penguins eat herring, krill and squid; the keepers feed them twice a day by hand.",
        "Penguins sleep standing up on the rocks, mostly at night and in short naps.",
        "The penguin enclosure is next to the lake, on the left of the main path.",
    ],
    "lion": [
        "Lions eat beef and chicken; an adult lion takes about seven kilograms of meat a day.",
        "Lions sleep up to twenty hours a day, mostly in the heat of the afternoon.",
        "The lion enclosure is behind the restaurant, by the north gate.",
    ],
    "tortoise": [
        "Tortoises eat leaves, grass and fruit; the keepers add calcium to their salad.",
        "A giant tortoise can live more than one hundred and fifty years.",
        "The tortoise house is beside the reptile house, under the big oak tree.",
    ],
    "otter": [
        "Otters eat fish and crayfish; they hold hands while they sleep on the water.",
        "The otter pool is at the end of the wetlands trail, past the bridge.",
        "Otters are fed at eleven in the morning, and visitors may watch the feeding.",
    ],
}
GUIDE = [
    "Tickets for adults cost 24 euros; children under three enter free of charge.",
    "The car park opens at eight in the morning and costs five euros a day.",
    "Dogs are not allowed in the park, except assistance dogs.",
]
# One passage a chunk: the smallest static chunks OpenAI allows, none overlapping.
ONE_PASSAGE_A_CHUNK = {"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 0}}


def document(title: str, passages: list[str]) -> bytes:
    """A Markdown file: a title and each passage a paragraph, said again until it fills more than half of a
    100-token chunk, so that no two share one (the chunker ends a chunk at a paragraph's end past half)."""
    paragraphs = []
    for passage in passages:
        paragraph = passage
        while len(paragraph) < 220:
            paragraph += " " + passage
        paragraphs.append(paragraph)
    body = "\n\n".join(paragraphs)
    return f"# {title}\n\n{body}\n".encode()


def zoo_files() -> dict[str, bytes]:
    files = {f"{animal}.md": document(f"{animal.capitalize()}s", passages) for animal, passages in ZOO.items()}
    files["visitor-guide.md"] = document("Visitor guide", GUIDE)
    return files


@contextlib.asynccontextmanager
async def pgvector_databases() -> AsyncIterator[tuple[str, Callable[[], Awaitable[str]]]]:
    """An embedded Postgres with pgvector: the URL of a database migrated to head, and a function that
    makes another (dropped afterwards) on the same server."""
    made: list[str] = []
    async with pgvector_database() as url:

        async def another() -> str:
            name = await create_template(url)
            made.append(name)
            return with_database(url, name)

        try:
            yield url, another
        finally:
            for name in made:
                with contextlib.suppress(Exception):
                    await drop(url, name)
