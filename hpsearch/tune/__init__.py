"""Everything hpsearch does with Ray: the only package (with :mod:`hpsearch.submit`) that imports it.

- :mod:`~hpsearch.tune.runtime`: Ray's environment, start and stop, the shared-storage probe,
  SIGTERM, the trial slots, the threaded set-up.
- :mod:`~hpsearch.tune.tuner`: a JobSpec → Tune's ``Tuner`` (new, or restored for a resume).
- :mod:`~hpsearch.tune.callbacks`: the callback that keeps the search's record; the failure limit.
- :mod:`~hpsearch.tune.searcher`, :mod:`~hpsearch.tune.scheduler`: Optuna told the truth about
  stopped trials; ASHA by learning-rate phase (both rely on Tune internals, marked in each).
- :mod:`~hpsearch.tune.trial`: the functions Ray runs in the workers (every trial, each retraining).
- :mod:`~hpsearch.tune.final`: the final retraining as Ray tasks.
- :mod:`~hpsearch.tune.snapshot`: repairs of Tune's experiment snapshot before a resume.

Nothing is imported here: some of Ray's settings are read once, when ``ray`` is first imported,
and :func:`hpsearch.tune.runtime.import_ray` sets them first.
"""
