"""cocoa.curation: filters, deduplication and decontamination of teacher output (Polars over Arrow
shards, rejected rows kept with their rule), and the original:synthetic mixture with provenance."""
