"""Knowledge: the text of files, in chunks, embedded and stored in Postgres, and searched.

- `parse`: a file's text (plain, Markdown, HTML, PDF), off the event loop;
- `chunk`: OpenAI's static chunking strategy and the request model of `chunking_strategy`;
- `db`: the connection a call runs on, and the retrieval mode (`hybrid` or `full_text`);
- `store`: a file's chunks written into a store, replacing any before;
- `filters`: OpenAI's attribute filters, validated and compiled to SQL;
- `search`: hybrid or full-text search over stores, and `rewrite_query`.

The simulated embedding that keeps search meaningful offline is the simulated provider's
(`app.upstream.simulated.embedding_vector`): the indexer embeds through the upstream, whichever it is.
"""
