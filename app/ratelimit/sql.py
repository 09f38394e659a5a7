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
is one check and nothing waits. `ratelimit_charge` settles the difference between what a call reserved and
what it used, once its usage is known. Both functions are created by the migration
`2026_11_22_0001_initial_schema`; this module holds the statements that call them.
"""

TAKE = (
    "SELECT check_no, allowed, refused, remaining, reset_after, retry_after FROM ratelimit_take($1, $2, $3, $4, $5, $6)"
)
CHARGE = "SELECT ratelimit_charge($1, $2, $3, $4, $5)"
PRUNE = "DELETE FROM rate_limit_bucket WHERE expires_at < now() - interval '1 minute'"
