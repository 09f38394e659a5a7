"""Usage records: written in batches off the response path, reported per caller."""
