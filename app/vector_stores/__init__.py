"""Vector stores (`/v1/vector_stores`): stores of a user's files, indexed in the background, searched.

- `router` (stores, search) and `files` (a store's files and batches): the routes; `admin`: the operator's;
- `service`: the runtime's `vector_stores`, which the routes and file_search in runs call;
- `schemas`, `objects`, `inputs`, `errors`: OpenAI's shapes, rows as objects, requests read, refusals;
- `repository`: the routes' queries; `work`: the indexer's queue of files under leases;
- `indexer`: parse, chunk, embed and store attached files; `embedder`: embeddings through the pipeline;
- `retention`, `reindex`: expired and deleted users' knowledge removed; stores indexed again.

The knowledge core (parsing, chunking, storing and searching chunks) is app/knowledge.
"""
