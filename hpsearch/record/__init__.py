"""The record of a search: what it leaves on disk, and the only code that knows its layout.

- :mod:`~hpsearch.record.location`: where a search lives (``<storage>/<name>``, a folder or a URI,
  with a local mirror for a URI), its trial folders, and reading files there.
- :mod:`~hpsearch.record.trial_log`: the trial log (one JSON line per event), the trial statuses
  and stop reasons, folding the log into one record per trial, the driver's state file.
- :mod:`~hpsearch.record.checkpoints`: a trial's checkpoint folders and which one to use.
- :mod:`~hpsearch.record.outputs`: ``trials.parquet``, ``epochs.parquet``, ``best.yaml``, ``job.yaml``.

No Ray and no torch here: the record is read by ``hpsearch best`` and by tests without either.
"""
