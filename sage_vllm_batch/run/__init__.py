"""Running a job's rows: the model it runs (``model``), its points (``point``: one output dir's
rows, requests and commits), the frame that drives them (``drive``), and ``plan``, ``metrics``,
``progress``. Executors, sweeps and the service build on these."""
