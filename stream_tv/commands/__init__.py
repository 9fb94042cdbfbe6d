"""One module per command. Each has a planner, a pure function over headers that returns a
:class:`stream_tv.jobs.Job` (``plan_extract``, ``plan_merge``, ...), and the public function
that runs it with :func:`stream_tv.jobs.run_job` (``extract_task_vector``, ``merge_lora``,
...). A new command is a new module here plus its entry in ``cli.py``.
"""
