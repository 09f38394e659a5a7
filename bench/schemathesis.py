"""Schemathesis against a real gateway process: every operation of openapi.json, and no 5xx.

Usage: .venv/bin/python bench/schemathesis.py [--max-examples N] [--seed N] [--workers N]
                                              [--phases P,...] [--checks C,...] [--timeout S]

It starts a fake OpenAI upstream (tests/support/fake_upstream.py) in this process, creates an
empty database (migrated by `serve`, dropped at the end) and runs `python -m app serve` on it,
configured by environment like an operator's: the fake upstream, an admin key, bring-your-own-key
on, images in a temporary folder, batches paced fast enough that their event streams end. It
creates a key through the admin API (tier `internal`: limits checked, never biting), then runs
`schemathesis run openapi.json` (the committed document, so what clients are promised is what is
tested) with every phase, stateful included: the key as bearer for every route, the admin key
for `/admin/*`. Everything stays on loopback.

What schemathesis draws from the schema alone rarely gets past validation to the code behind it,
and never holds what breaks a database. So the run's config also gives it dictionaries: the
names the shipped catalog and assistants file configure (shared assistants, chat types, roles,
models, ...) for the fields that take them, and edge values (NUL, ids past their columns, days and
instants at the ends of the calendar, integers past 64 bits, forged cursors and object ids) mixed
into every string, integer and number. A run with the defaults takes about a minute.

The run is bounded by `--max-examples` per operation and phase and by `--timeout` for the whole.
It exits non-zero when schemathesis finds a server error (the `not_a_server_error` check: any
5xx), when the gateway logged an unhandled exception, or when the run overran its bound.
Schemathesis' JUnit report and the gateway's log are kept under bench/results/schemathesis/.
Postgres: SCHEMATHESIS_DATABASE_URL, else TEST_DATABASE_URL, else
postgresql://postgres@127.0.0.1:5432/test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # run as a script: tests/support is not on the path yet
from support.auth import ADMIN_KEY  # noqa: E402
from support.database import database_name, with_database  # noqa: E402
from support.fake_upstream import FakeUpstream  # noqa: E402
from support.gateway import gateway_env, gateway_process  # noqa: E402

LOCAL_DATABASE = "postgresql://postgres@127.0.0.1:5432/test"
RESULTS_DIR = ROOT / "bench" / "results" / "schemathesis"
SCHEMA = ROOT / "openapi.json"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
PHASES = "examples,coverage,fuzzing,stateful"
# What the gateway logs for an exception no handler expected: each is a 500 a client saw.
UNHANDLED = re.compile(r"unhandled error")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b")


def report(line: str = "") -> None:
    print(line, flush=True)


def summary(line: str) -> str:
    """An unhandled error's log line as the exception it ended with (JSON log lines), else the line."""
    try:
        record = json.loads(line)
    except ValueError:
        return line[:300]
    lines = str(record.get("exception") or record.get("message", "")).strip().splitlines()
    # The last "SomeError: ..." line: SQLAlchemy follows its error with the statement and a link.
    raised = next((text for text in reversed(lines) if EXCEPTION_LINE.match(text)), lines[-1] if lines else line)
    return raised[:300]


# Values schemathesis mixes into what it generates from the schema (its "dictionaries"): text the
# database cannot store, ids past their columns' widths, instants and days at the ends of the
# calendar, numbers past 64 bits. Strings that violate the schema (too long) are sent by its
# negative mode only. A lone surrogate cannot be sent: schemathesis encodes bodies as UTF-8
# (tests/test_inputs.py sends those).
EDGE_STRINGS = [
    "a\x00b",
    "\x00",
    "x" * 201,
    "x" * 301,
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00",
    "\u202e\ufeff\U0001f600",
    "%00",
    "9" * 30,
]
EDGE_INTEGERS = [-1, 0, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
EDGE_NUMBERS = [-1.0, 0.0, 1e15 + 1, 1e300, -1e300, 5e-324]
EDGE_DAYS = ["0001-01-01", "0001-01-02", "0001-01-20", "9999-12-30", "9999-12-31", "2026-06-30"]
# How often a string of the body is one of these instead of what the schema suggests.
EDGE_SHARE = 0.2
# How often a field naming a configured thing (a profile, a role, a model) names a real one: the
# requests that reach the code behind validation are the ones that find what validation missed.
KNOWN_SHARE = 0.6


# Page cursors of the Assistants API lists (and `run_id` filters): object ids, well-formed (a prefix and
# 32 hex digits) and nobody's, at both ends of the uuid range.
FORGED_IDS = [prefix + digit * 32 for prefix in ("thread_", "msg_", "run_", "step_", "asst_") for digit in "0f"]


def _image_cursor(created: str) -> str:
    return base64.urlsafe_b64encode(f"{created}|00000000-0000-0000-0000-000000000000".encode()).decode().rstrip("=")


def known_values() -> dict[str, list[str]]:
    """What the shipped catalog and assistants file configure, by the field that names it."""
    with (ROOT / "app" / "catalog.toml").open("rb") as file:
        catalog = tomllib.load(file)
    with (ROOT / "app" / "assistants.toml").open("rb") as file:
        assistants = tomllib.load(file)
    models = catalog["model"]
    images = [model for model in models if model.get("kind") == "image"]
    presets = assistants.get("voice_preset", {}).values()
    profiles = assistants.get("profile", {})
    return {
        # The shared assistants: one per profile of the assistants file, `asst_` + its name.
        "assistant_id": [f"asst_{name}" for name in profiles],
        "chat_type": [chat_type for profile in profiles.values() for chat_type in profile.get("chat_types", [])],
        "role": [preset["role"] for preset in presets],
        "language": sorted({language for preset in presets for language in preset["instructions"]}),
        "model": [name for model in models for name in (model["id"], *model.get("aliases", []))],
        "tier": list(catalog["tier"]),
        "size": sorted({size for model in images for size in model.get("sizes", [])}),
        "quality": sorted({quality for model in images for quality in model.get("qualities", [])}),
        "output_format": sorted({fmt for model in images for fmt in model.get("formats", [])}),
        "background": sorted({background for model in images for background in model.get("backgrounds", [])}),
    }


def body_string_fields(document: dict[str, Any]) -> set[str]:
    """Every string field of every JSON request body, as schemathesis binding paths (`items[*].prompt`)."""
    components = document.get("components", {}).get("schemas", {})
    found: set[str] = set()

    def walk(schema: Any, path: str, seen: frozenset[str]) -> None:
        if not isinstance(schema, dict):
            return
        reference = schema.get("$ref")
        if isinstance(reference, str):
            name = reference.rsplit("/", 1)[-1]
            if name not in seen:
                walk(components.get(name), path, seen | {name})
            return
        if schema.get("type") == "string" and path:
            found.add(path)
        for branch in (*schema.get("anyOf", ()), *schema.get("oneOf", ()), *schema.get("allOf", ())):
            walk(branch, path, seen)
        for name, child in schema.get("properties", {}).items():
            walk(child, f"{path}.{name}" if path else name, seen)
        if "items" in schema and path:
            walk(schema["items"], f"{path}[*]", seen)

    for operation in (op for item in document["paths"].values() for op in item.values() if isinstance(op, dict)):
        content = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
        walk(content.get("schema"), "", frozenset())
    return found


def config_text(user_key: str) -> str:
    """The run's schemathesis.toml: the user's key everywhere, the admin key on /admin routes, and
    the dictionaries every string, integer and number is sometimes drawn from.

    Both kinds of route declare the same `HTTPBearer` scheme, so the header is set per operation.
    """
    known = known_values()
    dictionaries: dict[str, list[Any]] = {
        "edge": EDGE_STRINGS,
        "edge_integers": EDGE_INTEGERS,
        "edge_numbers": EDGE_NUMBERS,
        "days": EDGE_DAYS,
        "cursors": [
            *EDGE_STRINGS,
            *FORGED_IDS,
            _image_cursor("0001-01-01T00:00:00+14:00"),
            _image_cursor("9999-12-31T23:59:59-14:00"),
        ],
        **{f"known_{field}": [*values, *EDGE_STRINGS] for field, values in known.items() if values},
    }
    bindings: dict[str, tuple[str, float]] = {}
    with SCHEMA.open("rb") as file:
        document = json.load(file)
    for path in sorted(body_string_fields(document)):
        field = path.rsplit(".", 1)[-1]
        known_field = f"known_{field}" in dictionaries
        bindings[f"body.{path}"] = (f"known_{field}", KNOWN_SHARE) if known_field else ("edge", EDGE_SHARE)
    bindings |= {
        "query.assistant_id": ("known_assistant_id", KNOWN_SHARE),
        "path.assistant_id": ("known_assistant_id", KNOWN_SHARE),
        "query.start": ("days", KNOWN_SHARE),
        "query.end": ("days", KNOWN_SHARE),
        "query.after": ("cursors", KNOWN_SHARE),
        "query.before": ("cursors", KNOWN_SHARE),
        "query.run_id": ("cursors", KNOWN_SHARE),
    }
    lines = [f"headers = {{ Authorization = {_toml(f'Bearer {user_key}')} }}", ""]
    lines += ["[cache]", "enabled = false  # each run starts from its seed alone, not from earlier runs' crashes", ""]
    lines += ["[generation.dictionaries]"]
    lines += [f'string = {{ dictionary = "edge", probability = {EDGE_SHARE} }}']
    lines += [f'integer = {{ dictionary = "edge_integers", probability = {EDGE_SHARE} }}']
    lines += [f'number = {{ dictionary = "edge_numbers", probability = {EDGE_SHARE} }}', ""]
    for name, values in dictionaries.items():
        lines += [f"[dictionaries.{name}]", f"values = [{', '.join(_toml(value) for value in values)}]", ""]
    lines += ["[parameters]"]
    lines += [
        f'{_toml(key)} = {{ dictionary = "{name}", probability = {share} }}' for key, (name, share) in bindings.items()
    ]
    lines += ["", "[[operations]]", 'include-path-regex = "^/admin/"']
    lines += [f"headers = {{ Authorization = {_toml(f'Bearer {ADMIN_KEY}')} }}", ""]
    return "\n".join(lines)


def _toml(value: object) -> str:
    """A TOML value: JSON's escapes (\\u0000 included) are TOML's; non-ASCII stays as UTF-8, since
    TOML cannot take a surrogate pair's escapes."""
    return json.dumps(value, ensure_ascii=False)


def gateway_settings(data_dir: Path) -> dict[str, str]:
    return {
        "DATA_DIR": str(data_dir),
        "IMAGE_DIR": str(data_dir / "images"),
        "BYOK_ENCRYPTION_KEYS": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        # A batch's event stream lasts until its items are done: keep that within a request timeout.
        "IMAGE_BATCH_ITEMS_PER_MINUTE": "60000",
        "IMAGE_BATCH_POLL_SECONDS": "0.05",
        "STREAM_HEARTBEAT_SECONDS": "1",
        # Schemathesis sends bad tokens on purpose: their refusals must not lock the run out.
        "AUTH_FAILURES_PER_MINUTE": "1000000",
        "LOG_PROMPTS": "false",
    }


async def run_schemathesis(args: argparse.Namespace, config: Path, url: str, deadline: float) -> int | None:
    """Schemathesis' exit code; None when it overran the deadline (it is stopped)."""
    command = [
        str(SCHEMATHESIS),
        "--no-color",
        "--config-file",
        str(config),
        "run",
        str(SCHEMA),
        "--url",
        url,
        "--checks",
        args.checks,
        "--phases",
        args.phases,
        "--max-examples",
        str(args.max_examples),
        "--workers",
        str(args.workers),
        "--seed",
        str(args.seed),
        "--request-timeout",
        "30",
        "--generation-database",
        "none",
        "--suppress-health-check",
        "all",
        "--continue-on-failure",
        "--report",
        "junit",
        "--report-dir",
        str(RESULTS_DIR),
    ]
    report("$ " + " ".join(command))
    process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, start_new_session=True)
    try:
        return await asyncio.wait_for(process.wait(), max(deadline - time.monotonic(), 1.0))
    except TimeoutError:
        process.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 10)
        if process.returncode is None:
            process.kill()
            await process.wait()
        return None


async def main(args: argparse.Namespace) -> int:
    server = os.environ.get("SCHEMATHESIS_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL") or LOCAL_DATABASE
    name = database_name("gateway_schemathesis")
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    shutil.rmtree(RESULTS_DIR, ignore_errors=True)
    RESULTS_DIR.mkdir(parents=True)
    log = RESULTS_DIR / "gateway.log"
    upstream = FakeUpstream()
    await upstream.start()
    started = time.monotonic()
    deadline = started + args.timeout
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-schemathesis-") as tmp:
            env = gateway_env(with_database(server, name), upstream, **gateway_settings(Path(tmp)))
            async with gateway_process(env, log) as gateway:
                key, user = await gateway.key("internal")
                config = Path(tmp) / "schemathesis.toml"
                config.write_text(config_text(key))
                report(f"gateway {gateway.url} (log {log.relative_to(ROOT)}); key of user {user}, tier internal")
                code = await run_schemathesis(args, config, gateway.url, deadline)
    finally:
        await upstream.stop()
        admin = await asyncpg.connect(server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
    elapsed = time.monotonic() - started
    unhandled = [summary(line) for line in log.read_text(errors="replace").splitlines() if UNHANDLED.search(line)]
    report()
    report(f"ran {elapsed:.0f} s; the fake upstream answered {len(upstream.requests)} requests")
    report(f"schemathesis: {'TIMEOUT' if code is None else f'exit {code}'}")
    report(f"unhandled errors in the gateway's log: {len(unhandled)}")
    for line, count in Counter(unhandled).most_common():
        report(f"  {count} x {line}")
    report(f"reports: {RESULTS_DIR.relative_to(ROOT)}/")
    return 0 if code == 0 and not unhandled else 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=100, help="test cases per operation and phase")
    parser.add_argument("--seed", type=int, default=1, help="hypothesis seed: the same seed, the same run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--phases", default=PHASES)
    parser.add_argument("--checks", default="not_a_server_error", help="schemathesis checks (all: conformance too)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run, then it fails")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
