"""Analysis of a study: MLflow runs (or the published runs/) -> long table -> collapse rules -> scores -> verdicts
-> figures, tables, report page.

| module | concern |
|---|---|
| `errors` | `AnalysisError`: bad input the CLI reports on one line with exit code 2 |
| `layout` | where a study's outputs live (`results/<study>/<scale>/...`), default tracking URI |
| `metrics` | the metric keys the analysis reads, with axis labels and file names |
| `runs` | run metadata from MLflow tags/params; choice of one attempt per cell |
| `cache` | per-run parquet store of finished runs (`runs/`, published with the study) |
| `pooling` | no silent pooling: runs of one line must be replicates (`--only` selects); code versions |
| `load` | MLflow (or the cache) -> `StudyData`, the long table |
| `collapse` | configurable collapse rules and their per-run verdicts |
| `question` | the study's declared hypothesis, read from its sweep file |
| `stats` | t-intervals, paired differences, power, Clopper-Pearson, sign-flip, TOST, Holm, McNemar (scipy.stats) |
| `summary` | per-run scores over the full budget (final, last-k, AUC, gain, falls below start, ratio stats) |
| `paired` | objective minus baseline per seed and cell (Holm per measure), the verdict words, the on-policy control |
| `verdicts` | the verdicts with the seed as the unit: the declared primary question first, corrected by family |
| `limitations` | what the results are conditional on, read from the runs |
| `style` | colorblind-safe colours and line styles per objective |
| `figures` | curve grids, the stable-regime map, the verdict figure |
| `tables` | per (cell, line) numbers over seeds |
| `formatting` | the tables as Markdown, LaTeX and CSV |
| `report` | `README.md` of a study: method, control, verdict, tables, figures, run ids |
| `pipeline` | load -> figures/tables/report, as the CLI runs it |
| `synthetic` | synthetic MLflow studies with known curves (tests, benchmark) |
| `replicate` | does a rerun reproduce a published study's conclusions? |
| `bench` | warm-cache vs cold-store regeneration timing |
| `cli` | `python -m analysis figures|tables|replicate|bench ...` |
"""
