"""Everything a run writes into ``output.dir``: the file names (``files``), Parquet ``shards`` and
their ledger, the ``manifest``, the ``lock``, the resume-or-refuse decision (``outdir``), and the
extra sinks (``vector_stores``, the ``openai_batch`` output file)."""
