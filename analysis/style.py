"""One colour, line style and marker per objective, the same in every figure (colour-blind-safe palette).

Every objective of the zoo has a pinned entry, so its colour never depends on which other objectives a study
has: a figure of grpo vs cfpo and one of all eight draw grpo alike. Each palette entry also has its own
(line style, marker) pair, so curves still separate in greyscale print and for readers who cannot tell two
hues apart. Names outside the zoo (ablation lines such as `cfpo trl.max_grad_norm=0.0`) take, in name order,
the entries no pinned objective of the same figure uses: distinct within a figure, but only pinned names keep
their colour across figures (add a name to FIXED to pin it).
"""
from __future__ import annotations

from collections.abc import Iterable

# Okabe & Ito (2008), "Color Universal Design"; black and yellow last (yellow is faint on white).
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#56B4E9", "#E69F00", "#000000", "#F0E442")
# Paul Tol's "muted" scheme (also colour-blind safe): wine, olive, indigo extend Okabe-Ito past 8 lines.
TOL_MUTED = ("#882255", "#999933", "#332288")
# Okabe-Ito without yellow, then Tol, yellow last: the 10 readable colours come before the faint one.
PALETTE = OKABE_ITO[:7] + TOL_MUTED + OKABE_ITO[7:]
# Entry i of the palette draws with LINESTYLES[i % 4] and MARKERS[i]: every entry is distinct in greyscale.
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")
# Pinned colours. grpo and cfpo keep the colours of the published figures; clip-higher (a GRPO variant) is
# the lighter blue beside grpo's. gppo and pg-is take Tol colours.
FIXED = {"grpo": "#0072B2", "cfpo": "#D55E00", "gspo": "#009E73", "cispo": "#CC79A7", "clip-higher": "#56B4E9",
         "sapo": "#E69F00", "gppo": "#882255", "pg-is": "#999933"}
# Legend, table and baseline order: these first, the rest alphabetically (the default baseline is grpo).
FIRST = ("grpo", "cfpo")


def objective_order(objectives: Iterable[str]) -> list[str]:
    """FIRST objectives (grpo, cfpo), then the rest alphabetically: legend order everywhere."""
    names = set(objectives)
    return [o for o in FIRST if o in names] + sorted(names - set(FIRST))


def _entry(i: int) -> dict[str, str]:
    return {"color": PALETTE[i % len(PALETTE)], "linestyle": LINESTYLES[i % len(LINESTYLES)],
            "marker": MARKERS[i % len(MARKERS)]}


def objective_styles(objectives: Iterable[str]) -> dict[str, dict[str, str]]:
    """{objective: {"color", "linestyle", "marker"}} in objective_order.

    Pinned names get their FIXED entry; other names, in order, the palette entries left free by the pinned
    names present (so up to len(PALETTE) lines stay distinct), cycling only beyond that.
    """
    order = objective_order(objectives)
    taken = {PALETTE.index(FIXED[o]) for o in order if o in FIXED}
    free = iter([i for i in range(len(PALETTE)) if i not in taken])
    styles = {}
    for n, name in enumerate(order):
        styles[name] = _entry(PALETTE.index(FIXED[name]) if name in FIXED else next(free, n))
    return styles
