"""The result-directory format of certify and predict: one schema, one writer, one reader, versioned.

Files in a result directory (one set per noise level σ, ``<s>`` = :func:`sigma_tag`, e.g. ``0.25``):

- ``sigma_<s>.tsv``: one row per image, columns ``idx label predict radius correct time count n_used
  p_lower`` (:data:`CERTIFY_COLUMNS`). The first six are Cohen et al.'s ``certify.py`` columns, so their
  ``analyze.py`` (which reads columns by name) works unchanged; ``time`` is in seconds (a float, not Cohen's
  ``h:mm:ss``). The three trailing columns are ours: ``count`` = votes ``n_A`` for the selected class among
  the ``n_used`` estimation samples (``n_used = n`` for CERTIFY; fewer when sequential certification stops
  early), ``p_lower`` = the lower confidence bound on ``p_A`` behind the radius (one-sided Clopper-Pearson at
  level ``alpha``; at ``alpha / stages`` for sequential). Keeping ``count`` lets a report recompute bounds at
  another level (e.g. ``alpha / k`` for a best-over-k-sigmas certificate, DESIGN rule 5). Abstentions have
  ``predict = -1``, ``radius = 0``, ``correct = 0``.
- ``sigma_<s>.json``: sidecar with ``format`` (:data:`FORMAT`) and ``version`` (:data:`FORMAT_VERSION`), the
  settings (sigma, n0, n, alpha, seed, checkpoint, dataset, split, ...; again under ``settings``, which a
  resume compares), the image selection, git revision, environment and the history of sessions that wrote
  the TSV.
- ``summary.json``: per sigma, certified accuracy at radii ``0, 0.25, ...`` (``{"0": .., "0.25": ..}``) up
  to one step past the largest radius ``n`` samples can certify, ACR, abstain rate, smoothed clean accuracy,
  images/s and samples/s; rebuilt from all sidecars + TSVs after each sigma.
- Sharded runs (``shard=(k, K)``, one process per GPU into the same directory) write
  ``sigma_<s>.shard<k>of<K>.tsv/.json``; ``summary.json`` and :func:`load_run` merge the shards of each
  sigma, and :func:`merge_shards` writes ``sigma_<s>.merged.tsv`` (all rows by ``idx``) for ``analyze.py``.
- PREDICT: ``predict_sigma_<s>.tsv`` (``idx label predict correct time``), ``predict_sigma_<s>.json``,
  ``predict_summary.json``.
- ``.<stem>.lock``: held by the process writing ``<stem>.tsv`` (see :mod:`smoothtransfer.smoothing.runner`).

Versions: files without ``version`` (written before it was recorded) read as version 1; a sidecar or summary of
a newer version is refused in one line by every reader and by a resume. Cohen et al.'s raw ``certify.py``
output (no sidecar, ``h:mm:ss`` times, ``noise_0.25/test/sigma_0.25``) reads through :func:`load_run` too.

Modules: :mod:`.schema` (names, columns, version), :mod:`.write` (resume inspection, sidecars, durable
rows), :mod:`.summary` (``summary.json``, shard merges), :mod:`.read` (:func:`load_run` → :class:`Run` of
:class:`SigmaResult`, used by ``report``, the experiment tables and users). The engine that computes the
rows is :mod:`smoothtransfer.smoothing.runner`; nothing here imports it.
"""

from smoothtransfer.smoothing.results.read import (
    Run,
    SigmaResult,
    load_run,
    read_rows,
    read_sidecar,
    read_tsv,
    result_files,
)
from smoothtransfer.smoothing.results.schema import (
    CERTIFY_COLUMNS,
    COLUMNS,
    FORMAT,
    FORMAT_VERSION,
    PREDICT_COLUMNS,
    PREDICT_SUMMARY_FILE,
    SUMMARY_FILE,
    check_version,
    result_stem,
    sigma_tag,
)
from smoothtransfer.smoothing.results.summary import (
    complete_sigmas,
    merge_shards,
    read_summary,
    summarize_dir,
    summary_entry,
    summary_sigmas,
    write_summary,
)

__all__ = [
    "CERTIFY_COLUMNS",
    "COLUMNS",
    "FORMAT",
    "FORMAT_VERSION",
    "PREDICT_COLUMNS",
    "PREDICT_SUMMARY_FILE",
    "Run",
    "SUMMARY_FILE",
    "SigmaResult",
    "check_version",
    "complete_sigmas",
    "load_run",
    "merge_shards",
    "read_rows",
    "read_sidecar",
    "read_summary",
    "read_tsv",
    "result_files",
    "result_stem",
    "sigma_tag",
    "summarize_dir",
    "summary_entry",
    "summary_sigmas",
    "write_summary",
]
