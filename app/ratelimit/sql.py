"""The limit functions, installed by migration and called with one round trip each.

Algorithm: GCRA (the generic cell rate algorithm) for per-minute and per-hour rates,
and plain calendar windows for daily quotas and monthly budgets.

GCRA keeps one number per user and limit, the theoretical arrival time (TAT): each
unit of cost pushes it `period / limit` seconds ahead, and a call is refused when the
TAT would run more than `period` ahead of now. It gives exactly `limit` calls to a
burst, then a steady refill, with none of a fixed window's double burst at the
boundary and none of a sliding log's rows per call. Daily and monthly quotas are what
users read on a bill ("50 images a day", "$5 a month"), so those reset on the calendar.

`ratelimit_take` decides a batch of checks in one statement: it locks every bucket
of the batch in key order (no deadlocks between concurrent batches), decides the checks
in order, each charging all of its buckets or none (a refused call costs nothing), and
writes each bucket once. A process sends the checks that arrive while its previous
batch is in flight as the next batch, so under load many calls share a round trip and
a user's row is written once per batch instead of once per call; at low load a batch
is one check and nothing waits. `ratelimit_charge` settles the difference between what a
call reserved and what it used, once its usage is known. Both functions are created by the
migrations (`0001_initial_schema`; the budget rule revised in `0007`); this module holds the
statements that call them.

`TAKE` also writes each allowed call into `usage_pending` in the same statement, so a call
reaches the upstream only once that is committed (app/usage/ledger.py). A call with no
limits is written too: it is allowed, and `ratelimit_take` returns nothing for it.
"""

from app.usage.ledger import PENDING_COLUMNS

_PENDING_ARRAYS = ", ".join(f"${number}::{kind}" for number, (_, kind) in enumerate(PENDING_COLUMNS, 9))
_PENDING_NAMES = ", ".join(name for name, _ in PENDING_COLUMNS)

TAKE = f"""
WITH taken AS MATERIALIZED (
    SELECT * FROM ratelimit_take($1, $2, $3, $4, $5, $6)
), pending AS (
    INSERT INTO usage_pending (owner, {_PENDING_NAMES})
    SELECT $7, {_PENDING_NAMES}
    FROM unnest($8::int[], {_PENDING_ARRAYS}) AS p(check_no, {_PENDING_NAMES})
    WHERE NOT EXISTS (SELECT 1 FROM taken WHERE taken.check_no = p.check_no AND NOT taken.allowed)
    ON CONFLICT (call_id) DO NOTHING
)
SELECT check_no, allowed, refused, remaining, reset_after, retry_after FROM taken
"""
CHARGE = "SELECT ratelimit_charge($1, $2, $3, $4, $5)"
PRUNE = "DELETE FROM rate_limit_bucket WHERE expires_at < now() - interval '1 minute'"
