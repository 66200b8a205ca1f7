"""cocoa.testing: small, deterministic fixtures that tests and ``bench/`` build data from (MMEB-format
parquet + image zips, curation corpora). Not used by the commands."""
