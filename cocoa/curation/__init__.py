"""cocoa.curation: filters, deduplication and decontamination of teacher output (Polars over Arrow
shards, rejected rows kept with their rule), and the original:synthetic mixture with provenance.

``pipeline`` (``run_curation``, the `cocoa-data curate` command) reads its inputs (``inputs``), builds one
frame of features (``frame``), applies the rules (``rules/``, one module per family, in the order of
``rules.STEPS``) with the runner (``steps``), writes ``curated/`` and the rejected rows (``rejected``, through
``output``'s staged swap) and the report (``report``). ``text``, ``images``, ``dedup`` and ``decontam`` hold
the algorithms the rules use; ``mix`` is `cocoa-data mix`; ``config`` every setting."""
