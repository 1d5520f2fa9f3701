"""No silent pooling: the runs averaged as seeds of one line must be the same experiment but for the seed.

A line is (objective and extra sweep axes, batch_ratio, iterations). Its runs must share the replicate hash the
harness records at launch (harness.replicate_hash: the resolved config without the seed); runs from before
that tag are compared by their params instead. Runs of one line that differ in anything else (a non-axis
`--set rollout_batches=10`, an edited sweep file) are an error naming the differing fields; `--only KEY=VALUE`
selects one setting. Code versions are not an error but are reported: `code_versions` lists them.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

from analysis.errors import AnalysisError
from analysis.runs import RunInfo


def select(infos: list[RunInfo], only: Mapping[str, str]) -> list[RunInfo]:
    """The runs whose params match every KEY=VALUE of `only` (values compared as logged text)."""
    if not only:
        return infos
    params = [json.loads(i.params) for i in infos]
    known = set().union(*params) if params else set()
    for key in only:
        if key not in known:
            raise AnalysisError(f"--only {key}: no run has this param; params: {', '.join(sorted(known)) or 'none'}")
    return [i for i, p in zip(infos, params) if all(p.get(k) == v for k, v in only.items())]


def check_replicates(infos: list[RunInfo]) -> None:
    """AnalysisError naming the differing fields when the runs of one line are not replicates."""
    lines: dict[tuple[str, int, int], list[RunInfo]] = {}
    for info in infos:
        lines.setdefault((info.objective, info.batch_ratio, info.iterations), []).append(info)
    for (label, b, it), runs in sorted(lines.items()):
        by_hash = all(i.replicate for i in runs)
        keys = {i.replicate if by_hash else i.params for i in runs}
        if len(keys) < 2:
            continue
        params = [json.loads(i.params) for i in runs]
        fields = sorted(k for k in set().union(*params) if len({p.get(k) for p in params}) > 1)
        if not fields:
            raise AnalysisError(f"runs of {label} at batch ratio {b} x iterations {it} carry different replicate "
                                f"hashes ({', '.join(sorted(keys))}) but no differing param: mixed harness "
                                "versions? analyse them as separate experiments")
        shown = "; ".join(f"{f} = {', '.join(sorted({str(p.get(f, '(unset)')) for p in params}))}"
                          for f in fields[:4])
        more = f" (and {len(fields) - 4} more)" if len(fields) > 4 else ""
        raise AnalysisError(f"runs of {label} at batch ratio {b} x iterations {it} differ in {shown}{more}: "
                            f"not seeds of one experiment; choose one with --only {fields[0]}=VALUE, or make "
                            f"{fields[0]} a sweep axis")


def code_versions(infos: list[RunInfo]) -> dict[str, int]:
    """{"<commit>", "<commit> (dirty tree[, diff <hash>])" or "unknown": number of runs}, most runs first."""
    counts: dict[str, int] = {}
    for i in infos:
        key = i.git_commit or "unknown"
        if i.git_dirty == "true":
            key += f" (dirty tree, diff {i.git_diff_hash[:12]})" if i.git_diff_hash else " (dirty tree)"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def one_clean_commit(versions: dict[str, int]) -> bool:
    """Every run from one commit, with a clean tree: the only code a published number may come from."""
    (key, *rest) = versions or {"unknown": 0}
    return not rest and key != "unknown" and "dirty" not in key
