"""One colour and line style per objective, the same in every figure (Okabe-Ito palette: colorblind-safe)."""
from __future__ import annotations

from collections.abc import Iterable

# Okabe & Ito (2008), "Color Universal Design"; black and yellow last (yellow is faint on white).
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#56B4E9", "#E69F00", "#000000", "#F0E442")
# The study's two objectives get fixed colours so figures of different studies read alike.
FIXED = {"grpo": "#0072B2", "cfpo": "#D55E00"}
# Line styles too, so the curves still separate in greyscale print.
LINESTYLES = ("-", "--", "-.", ":")


def objective_order(objectives: Iterable[str]) -> list[str]:
    """Fixed objectives first (grpo, cfpo), then the rest alphabetically: legend order everywhere."""
    names = set(objectives)
    return [o for o in FIXED if o in names] + sorted(names - set(FIXED))


def objective_styles(objectives: Iterable[str]) -> dict[str, dict[str, str]]:
    """{objective: {"color", "linestyle"}}; unknown objectives take the unused palette colours in name order."""
    order = objective_order(objectives)
    spare = iter(c for c in OKABE_ITO if c not in FIXED.values())
    styles = {}
    for i, name in enumerate(order):
        color = FIXED.get(name) or next(spare, OKABE_ITO[i % len(OKABE_ITO)])
        styles[name] = {"color": color, "linestyle": LINESTYLES[i % len(LINESTYLES)]}
    return styles
