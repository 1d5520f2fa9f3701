"""Analysis of a study: MLflow runs -> long table (cached) -> collapse rules -> figures, tables, report page.

| module | concern |
|---|---|
| `errors` | `AnalysisError`: bad input the CLI reports on one line with exit code 2 |
| `layout` | where a study's outputs live (`results/<study>/<scale>/...`), default tracking URI |
| `metrics` | the metric keys the analysis reads, with axis labels and file names |
| `runs` | run metadata from MLflow tags/params; choice of one attempt per cell |
| `cache` | per-run parquet cache of finished runs |
| `load` | MLflow (or the cache) -> `StudyData`, the long table |
| `collapse` | configurable collapse rules and their per-run verdicts |
| `stats` | mean and t-interval over seeds (scipy.stats) |
| `summary` | per-run scalar summaries of the curves (final, peak, AUC, ...) |
| `style` | colorblind-safe colours and line styles per objective |
| `figures` | curve grids and the stable-regime map |
| `tables` | per-cell table, Markdown and LaTeX |
| `report` | `README.md` of a study |
| `pipeline` | load -> figures/tables/report, as the CLI runs it |
| `synthetic` | synthetic MLflow studies with known curves (tests, benchmark) |
| `bench` | warm-cache vs cold-store regeneration timing |
| `cli` | `python -m analysis figures|tables|bench ...` |
"""
