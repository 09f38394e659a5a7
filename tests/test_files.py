"""Files (`/v1/files`) through the official SDK's `client.files`: upload, list, retrieve, content, delete.

The module's gateways store files in a folder of their own and read a catalog with two small
tiers besides the shipped ones: `tiny` (64 KiB a file, 100 KiB in all) and `few` (two files).
After each test what a client saw is checked against what was kept: the `file` rows, and the
objects in the storage folder (temporary `.part` files included).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import shutil
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pypdf
import pytest

from app.config import DEFAULT_CATALOG
from support import internals
from support.auth import bearer
from support.documents import pdf
from support.errors import assert_error
from support.gateway import Gateway, GatewayFactory
from support.images import moto_s3

FILES = "/v1/files"
KIB = 1024
SMALL_TIERS = """
[tier.tiny]
models = ["*"]
file_bytes_max = 65536
storage_bytes_max = 102400

[tier.few]
models = ["*"]
files_max = 2
"""
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"


@pytest.fixture(scope="module")
def file_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="module")
def gateway_settings(file_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    catalog = tmp_path_factory.mktemp("catalog") / "catalog.toml"
    catalog.write_text(DEFAULT_CATALOG.read_text() + SMALL_TIERS)
    return {"image_dir": file_dir, "catalog_file": catalog}


@pytest.fixture
def stored(file_dir: Path) -> Callable[[], list[str]]:
    """The storage's files as keys, hidden ones too; emptied for each test (its rows are too)."""
    shutil.rmtree(file_dir / "files", ignore_errors=True)

    def keys() -> list[str]:
        return sorted(path.relative_to(file_dir).as_posix() for path in file_dir.rglob("*") if path.is_file())

    return keys


def sdk(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


async def rows(db: asyncpg.Pool) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM file ORDER BY created_at, id")


def row_id(file_id: str) -> uuid.UUID:
    assert file_id.startswith("file-") and len(file_id) == 37, file_id
    return uuid.UUID(hex=file_id[5:])


# --- the round trip ------------------------------------------------------------------------


async def test_upload_list_retrieve_download_and_delete(gateway: Gateway, db, stored) -> None:
    key, user = await gateway.key("free")
    client = sdk(gateway, key)
    text = "# Lions\n\nLions sleep up to 20 hours a day. Ünïcödé is fine.\n".encode()

    created = await client.files.create(file=("care notes.md", text), purpose="assistants")
    assert created.object == "file" and created.status == "processed"
    assert (created.filename, created.bytes, created.purpose) == ("care notes.md", len(text), "assistants")
    assert created.expires_at is None
    assert created.model_extra == {"content_type": "text/markdown"}
    [row] = await rows(db)
    assert row["id"] == row_id(created.id) and row["user_id"] == user
    assert int(row["created_at"].timestamp()) == created.created_at
    assert row["sha256"] == hashlib.sha256(text).hexdigest()
    assert stored() == [row["storage_key"]] and row["storage_key"].startswith("files/")

    assert await client.files.retrieve(created.id) == created
    listed = await client.files.list()
    assert [item.id for item in listed.data] == [created.id]
    content = await client.files.with_raw_response.content(created.id)
    assert content.headers["content-type"] == "text/markdown; charset=utf-8"
    assert content.parse().content == text

    deleted = await client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    assert await rows(db) == [] and stored() == []
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(created.id)


async def test_a_pdf_is_stored_and_served_as_application_pdf(gateway: Gateway, db, stored) -> None:
    key, _ = await gateway.key("free")
    client = sdk(gateway, key)
    document = pdf([["Elephants drink up to 200 litres of water a day."]])
    assert "200 litres" in pypdf.PdfReader(io.BytesIO(document)).pages[0].extract_text()  # a real PDF

    created = await client.files.create(file=("factsheet.txt", document), purpose="assistants")
    assert created.model_extra == {"content_type": "application/pdf"}  # its bytes, not its name
    content = await client.files.with_raw_response.content(created.id)
    assert content.headers["content-type"] == "application/pdf"
    assert content.parse().content == document
    [row] = await rows(db)
    assert row["content_type"] == "application/pdf" and row["bytes"] == len(document)


@pytest.mark.parametrize(
    ("name", "body", "content_type"),
    [
        ("page.txt", b"\xef\xbb\xbf\n  <!DOCTYPE html><html><body>Zebras</body></html>", "text/html"),
        ("page.htm", b"<html lang='en'><p>Zebras</p></html>", "text/html"),
        ("notes.markdown", b"Zebras *stripe*.", "text/markdown"),
        ("notes.pdf", b"<h1>not a doctype</h1>", "text/plain"),
        ("a", b"%PD", "text/plain"),
    ],
)
async def test_the_type_comes_from_the_bytes(gateway: Gateway, name: str, body: bytes, content_type: str) -> None:
    key, _ = await gateway.key("free")
    created = await sdk(gateway, key).files.create(file=(name, body), purpose="user_data")
    assert created.model_extra == {"content_type": content_type}
    assert created.purpose == "user_data"


async def test_expires_after_sets_expires_at(gateway: Gateway, db) -> None:
    key, _ = await gateway.key("free")
    created = await sdk(gateway, key).files.create(
        file=("a.txt", b"x"), purpose="assistants", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert created.expires_at == created.created_at + 3600
    [row] = await rows(db)
    assert row["expires_at"] - row["created_at"] == timedelta(seconds=3600)


# --- what is refused -----------------------------------------------------------------------


async def test_an_image_named_txt_is_refused_naming_its_type(gateway: Gateway, db, stored) -> None:
    key, _ = await gateway.key("free")
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk(gateway, key).files.create(file=("notes.txt", PNG + b"\x00" * 4000), purpose="assistants")
    error = assert_error(refused.value.response, 400, code="unsupported_file", param="file")
    assert "'notes.txt' is image/png" in error["message"]
    assert await rows(db) == [] and stored() == []


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"text with a NUL \x00 in it", "application/octet-stream"),
        ("caf\u00e9 in Latin-1".encode("latin-1"), "application/octet-stream"),
        ("UTF-16 text".encode("utf-16"), "UTF-16"),
        (b"PK\x03\x04\x14\x00\x06\x00\x08\x00word/document.xml", "application/zip"),  # a .docx
        (b"", "is empty"),
    ],
)
async def test_what_is_not_text_html_or_pdf_is_refused(gateway: Gateway, db, stored, body: bytes, named: str) -> None:
    key, _ = await gateway.key("free")
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk(gateway, key).files.create(file=("doc.txt", body), purpose="assistants")
    assert named in assert_error(refused.value.response, 400, param="file")["message"]
    assert await rows(db) == [] and stored() == []


async def test_bad_fields_are_refused_naming_them(gateway: Gateway, db) -> None:
    key, _ = await gateway.key("free")
    client = sdk(gateway, key)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.files.create(file=("a.jsonl", b"{}"), purpose="fine-tune")
    assert_error(refused.value.response, 400, code="unsupported_value", param="purpose")
    with pytest.raises(openai.BadRequestError) as refused:
        await client.files.create(
            file=("a.txt", b"x"), purpose="assistants", expires_after={"anchor": "created_at", "seconds": 60}
        )
    assert_error(refused.value.response, 400, param="expires_after.seconds")
    form = {**bearer(key), "content-type": "multipart/form-data; boundary=b"}
    no_file = b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nassistants\r\n--b--\r\n'
    assert_error(await gateway.client.post(FILES, headers=form, content=no_file), 400, param="file")
    response = await gateway.client.post(
        FILES, headers=bearer(key), data={"purpose": "assistants", "model": "x"}, files={"file": ("a.txt", b"x")}
    )
    assert_error(response, 400, param="model")
    response = await gateway.client.post(FILES, headers=bearer(key), json={"purpose": "assistants"})
    assert "multipart/form-data" in assert_error(response, 400)["message"]
    assert await rows(db) == []


# --- caps ----------------------------------------------------------------------------------


async def test_a_file_over_the_tier_cap_is_413_and_leaves_nothing(gateway: Gateway, db, stored) -> None:
    key, _ = await gateway.key("tiny")
    with pytest.raises(openai.APIStatusError) as refused:
        await sdk(gateway, key).files.create(file=("big.txt", b"a" * (200 * KIB)), purpose="assistants")
    error = assert_error(refused.value.response, 413, code="payload_too_large", param="file")
    assert "65536 bytes" in error["message"]
    assert await rows(db) == [] and stored() == []


async def test_a_streamed_file_is_stopped_at_the_byte_past_the_cap(gateway: Gateway, db, stored) -> None:
    """No Content-Length (chunked): the file is refused when its bytes pass the cap, the rest unread."""
    key, _ = await gateway.key("tiny")
    sent = 0

    async def body() -> Any:
        nonlocal sent
        head = b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nassistants\r\n'
        yield head + b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n\r\n'
        for _ in range(40):  # 40 x 8 KiB: five times the cap
            sent += 8 * KIB
            yield b"a" * (8 * KIB)
            await asyncio.sleep(0.005)
        yield b"\r\n--b--\r\n"

    headers = {**bearer(key), "content-type": "multipart/form-data; boundary=b"}
    response = await gateway.client.post(FILES, headers=headers, content=body())
    assert_error(response, 413, code="payload_too_large", param="file")
    assert await rows(db) == [] and stored() == []


async def test_a_declared_length_over_the_cap_is_answered_before_the_body(gateway: Gateway, db, stored) -> None:
    key, _ = await gateway.key("tiny")
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST {FILES} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {512 * KIB}\r\n\r\n--b\r\n"
    )
    writer.write(head.encode())  # and nothing more of the 512 KiB
    try:
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 413 "), status
        headers = {}
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
    finally:
        writer.close()
    response = httpx.Response(413, headers=headers, content=body)
    assert_error(response, 413, code="payload_too_large", param="file")
    assert await rows(db) == [] and stored() == []


async def test_the_tier_totals_cap_bytes_and_files(gateway: Gateway, db, stored) -> None:
    tiny, tiny_user = await gateway.key("tiny")
    client = sdk(gateway, tiny)
    await client.files.create(file=("a.txt", b"a" * (60 * KIB)), purpose="assistants")
    with pytest.raises(openai.PermissionDeniedError) as refused:  # 60 + 60 KiB > 100 KiB
        await client.files.create(file=("b.txt", b"b" * (60 * KIB)), purpose="assistants")
    assert (
        "102400 bytes"
        in assert_error(refused.value.response, 403, code="storage_quota_exceeded", param="file")["message"]
    )
    await client.files.create(file=("c.txt", b"c" * (40 * KIB)), purpose="assistants")  # exactly full

    few, _ = await gateway.key("few")
    client = sdk(gateway, few)
    for name in ("d.txt", "e.txt"):
        await client.files.create(file=(name, b"x"), purpose="assistants")
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await client.files.create(file=("f.txt", b"x"), purpose="assistants")
    assert "at most 2 files" in assert_error(refused.value.response, 403, code="storage_quota_exceeded")["message"]
    kept = await rows(db)
    assert [row["filename"] for row in kept] == ["a.txt", "c.txt", "d.txt", "e.txt"]
    assert sum(row["bytes"] for row in kept if row["user_id"] == tiny_user) == 100 * KIB
    assert stored() == sorted(row["storage_key"] for row in kept)

    await client.files.delete((await client.files.list()).data[0].id)  # deleting makes room
    await client.files.create(file=("f.txt", b"x"), purpose="assistants")


async def test_racing_uploads_never_pass_the_total(gateway: Gateway, db, stored) -> None:
    key, _ = await gateway.key("tiny")
    client = sdk(gateway, key)
    uploads = [client.files.create(file=(f"{n}.txt", b"z" * (30 * KIB)), purpose="assistants") for n in range(8)]
    results = await asyncio.gather(*uploads, return_exceptions=True)
    landed = [result for result in results if not isinstance(result, BaseException)]
    refused = [result for result in results if isinstance(result, openai.PermissionDeniedError)]
    assert (len(landed), len(refused)) == (3, 5), results  # 3 x 30 KiB fit in 100 KiB, a 4th does not
    kept = await rows(db)
    assert sorted(row["id"] for row in kept) == sorted(row_id(result.id) for result in landed)
    assert sum(row["bytes"] for row in kept) == 90 * KIB
    assert stored() == sorted(row["storage_key"] for row in kept)


# --- ownership and lists -------------------------------------------------------------------


async def test_another_users_file_is_404_like_an_unknown_one(gateway: Gateway, db, stored) -> None:
    owner, _ = await gateway.key("free")
    other, _ = await gateway.key("free")
    created = await sdk(gateway, owner).files.create(file=("mine.txt", b"private"), purpose="assistants")
    unknown = "file-" + uuid.uuid4().hex
    for file_id in (created.id, unknown, "file-nothex", "thread_" + uuid.uuid4().hex):
        for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
            response = await gateway.client.request(method, f"{FILES}/{file_id}{path}", headers=bearer(other))
            error = assert_error(response, 404, param="file_id")
            assert error["message"] == f"No file found with id '{file_id}'."
    assert (await sdk(gateway, other).files.list()).data == []
    assert (await sdk(gateway, owner).files.retrieve(created.id)).id == created.id
    assert len(await rows(db)) == 1 and len(stored()) == 1


async def test_list_pages_by_creation_and_the_sdk_iterator_ends(gateway: Gateway) -> None:
    key, _ = await gateway.key("free")
    client = sdk(gateway, key)
    made = [(await client.files.create(file=(f"{n}.txt", b"n"), purpose="assistants")).id for n in range(5)]
    other = await client.files.create(file=("data.txt", b"u"), purpose="user_data")

    first = await client.files.list(limit=2, order="asc", purpose="assistants")
    assert [item.id for item in first.data] == made[:2] and first.has_more
    raw = await gateway.client.get(
        FILES, params={"limit": 2, "order": "asc", "purpose": "assistants"}, headers=bearer(key)
    )
    assert raw.json()["object"] == "list"
    assert (raw.json()["first_id"], raw.json()["last_id"]) == (made[0], made[1])
    second = await client.files.list(limit=2, order="asc", purpose="assistants", after=made[1])
    assert [item.id for item in second.data] == made[2:4] and second.has_more
    third = await client.files.list(limit=2, order="asc", purpose="assistants", after=made[3])
    assert [item.id for item in third.data] == made[4:] and not third.has_more

    newest_first = [item.id async for item in client.files.list(limit=2)]
    assert newest_first == [other.id, *reversed(made)]
    assert [item.id for item in (await client.files.list(purpose="user_data")).data] == [other.id]
    assert (await client.files.list(purpose="batch")).data == []  # OpenAI's, never kept here
    assert (await client.files.list(after="file-" + uuid.uuid4().hex)).data == []
    response = await gateway.client.get(FILES, params={"after": "nope"}, headers=bearer(key))
    assert_error(response, 400, param="after")
    response = await gateway.client.get(FILES, params={"limit": 10_001}, headers=bearer(key))
    assert_error(response, 400, param="limit")


# --- larger files and S3 -------------------------------------------------------------------

BIG_BODY = 24 * 1024 * 1024


async def test_a_file_of_several_megabytes_round_trips(
    gateway_with: GatewayFactory, db, file_dir: Path, stored
) -> None:
    document = b"".join(b"line %07d of the keeper's log\n" % n for n in range(110_000))  # ~3.4 MB
    async with gateway_with(max_body_bytes=BIG_BODY) as gateway:
        key, _ = await gateway.key("pro")
        client = sdk(gateway, key)
        created = await client.files.create(file=("log.txt", document), purpose="assistants")
        assert created.bytes == len(document)
        assert (await client.files.content(created.id)).content == document
        [row] = await rows(db)
        assert stored() == [row["storage_key"]]
        assert (file_dir / row["storage_key"]).read_bytes() == document


async def test_files_in_s3_stream_in_parts_and_leave_nothing_when_refused(gateway_with: GatewayFactory, db) -> None:
    from aiobotocore.session import get_session

    document = pdf([["Tigers swim."]]) + b"%" + b"t" * (9 * 1024 * 1024)  # two parts of a multipart upload
    with moto_s3() as endpoint:
        options = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
        async with get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1", **options) as s3:
            await s3.create_bucket(Bucket="files")
            async with gateway_with(
                max_body_bytes=BIG_BODY,
                image_storage="s3",
                image_s3_bucket="files",
                image_s3_endpoint_url=endpoint,
                image_s3_access_key_id="test",
                image_s3_secret_access_key="test",
            ) as gateway:
                key, _ = await gateway.key("pro")
                client = sdk(gateway, key)
                created = await client.files.create(file=("tigers.pdf", document), purpose="assistants")
                [row] = await rows(db)
                stored = await s3.get_object(Bucket="files", Key=row["storage_key"])
                assert stored["ContentType"] == "application/pdf"
                async with stored["Body"] as body:
                    assert await body.read() == document
                content = await client.files.with_raw_response.content(created.id)
                assert content.headers["content-length"] == str(len(document))
                assert content.parse().content == document

                with pytest.raises(openai.BadRequestError):  # a PNG after 9 MiB of text: one part was sent
                    await client.files.create(file=("x.txt", b"t" * (9 * 1024 * 1024) + PNG), purpose="assistants")
                assert (await s3.list_multipart_uploads(Bucket="files")).get("Uploads", []) == []

                await client.files.delete(created.id)
                assert (await s3.list_objects_v2(Bucket="files")).get("KeyCount") == 0
                assert await rows(db) == []


async def test_the_storage_sweep_keeps_files_and_deletes_their_orphans(
    gateway: Gateway, file_dir: Path, stored
) -> None:
    """Files share the image storage, whose sweep deletes bytes no row names: a file's row names its bytes."""
    key, _ = await gateway.key("free")
    await sdk(gateway, key).files.create(file=("kept.txt", b"kept"), purpose="assistants")
    [kept] = stored()
    orphan = file_dir / "files" / "2026" / "01" / "01" / uuid.uuid4().hex  # a process died before its row
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"lost")
    swept = await internals.runtime(gateway.app).image_retention.sweep_orphans(older_than=timedelta(0))
    assert swept == 1
    assert stored() == [kept]
