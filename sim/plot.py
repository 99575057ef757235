"""Pictures of a run: ``plot_timeline`` draws a PNG, ``timeline_frames`` gives notebooks the data.

The figure has three panels sharing one time axis:

* **nodes**: one lane per node, coloured by its status over time; the stretch during which a node
  is the dispatcher has a thick black outline, and a ``dispatcher`` lane on top is coloured by
  which node holds the term. Dashed vertical ticks mark each new term (``T3``).
* **faults**: one bar per injected fault, labelled with its kind and node, packed into rows so
  labels do not collide; each fault is also shaded faintly across every panel.
* **jobs**: queue depth and running jobs, as sampled by the world.

matplotlib is an optional extra (``shir[plot]``). It is imported inside the function and drives
the Agg canvas directly, so plotting never touches pyplot's global backend (a notebook's inline
backend keeps working).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shir.sim.world import RunResult

__all__ = ["FAULT_FAMILIES", "STATUS_COLOURS", "plot_timeline", "timeline_frames"]

STATUS_COLOURS: dict[str, str] = {
    "Online": "#2e9e44",
    "Limited": "#f0a202",
    "Offline": "#d62728",
    "Initializing": "#a0a0a0",
    "Upgrading": "#1f77b4",
    "Inactive": "#8e44ad",
    "Removed": "#1a1a1a",
}
_DISPATCHER_COLOURS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#c49c94")

# Fault kinds grouped for colour: what each family does to the cluster.
FAULT_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "node down": ("#d62728", ("crash", "hibernate", "stall", "upgrade")),
    "partition": ("#ff7f0e", ("partition", "control_partition", "isolate")),
    "messages": ("#9467bd", ("drop", "duplicate", "delay", "reorder")),
    "clock / speed": ("#17becf", ("clock_skew", "clock_jump", "slow")),
    "other": ("#7f7f7f", ()),
}
_FAMILY_OF = {k: fam for fam, (_c, kinds) in FAULT_FAMILIES.items() for k in kinds}

MAX_FAULT_ROWS = 6  # beyond this many label rows, faults are drawn without labels
_LABEL_PX_PER_CHAR = 5.6  # fontsize 7, DejaVu Sans: a rough width used to pack labels


def timeline_frames(result: RunResult) -> dict[str, Any]:
    """The run's timeline as plain lists, for tables and custom plots.

    Returns a dict with:

    * ``end_s``: simulated seconds at the end of the run;
    * ``status``: ``{node: [(start_s, end_s, status), ...]}``, contiguous, non-overlapping
      intervals from the node's registration (or first status) to ``end_s``;
    * ``dispatcher``: ``[(start_s, end_s, term, node_or_None), ...]``, one interval per term;
    * ``samples``: ``{"t_s": [...], "queued": [...], "running": [...]}``;
    * ``faults``: ``[{"start_s", "end_s", "kind", "node", "duration_s"}, ...]`` by start time.
    """
    tl = result.timeline
    end = float(result.simulated_s)

    # A node is Initializing from its registration (an event in the log, not in the timeline).
    changes: dict[str, list[tuple[float, str]]] = {}
    for e in result.log:
        if type(e).__name__ == "NodeRegistered":
            changes.setdefault(e.node, []).append((float(e.at), "Initializing"))  # type: ignore[attr-defined]
    for t, node, st in tl.get("status", ()):
        changes.setdefault(node, []).append((float(t), st))
    status: dict[str, list[tuple[float, float, str]]] = {}
    for node, rows in changes.items():
        rows.sort(key=lambda r: r[0])  # stable: same-time changes keep their order, last wins
        out: list[tuple[float, float, str]] = []
        for i, (t, s) in enumerate(rows):
            stop = rows[i + 1][0] if i + 1 < len(rows) else end
            stop = min(max(stop, t), end)
            if stop <= t:
                continue
            if out and out[-1][2] == s and out[-1][1] == t:
                out[-1] = (out[-1][0], stop, s)
            else:
                out.append((t, stop, s))
        status[node] = out

    terms = list(tl.get("dispatcher", ()))
    dispatcher = [
        (float(t), float(terms[i + 1][0]) if i + 1 < len(terms) else end, int(term), node)
        for i, (t, term, node) in enumerate(terms)
    ]

    samples = tl.get("samples", ())
    faults = [
        {"start_s": float(t), "end_s": min(end, float(t) + float(d or 0.0)), "kind": kind,
         "node": node, "duration_s": float(d or 0.0)}
        for t, kind, node, d in sorted(tl.get("faults", ()), key=lambda f: f[0])
    ]
    return {
        "end_s": end,
        "status": status,
        "dispatcher": dispatcher,
        "samples": {
            "t_s": [float(s[0]) for s in samples],
            "queued": [int(s[1]) for s in samples],
            "running": [int(s[2]) for s in samples],
        },
        "faults": faults,
    }


def _pack(spans: list[tuple[float, float]], max_rows: int) -> list[int] | None:
    """Greedy interval packing: a row per span so that none overlap, or None past max_rows."""
    row_ends: list[float] = []
    rows = []
    for start, stop in spans:
        for i, last in enumerate(row_ends):
            if start >= last:
                row_ends[i] = stop
                rows.append(i)
                break
        else:
            if len(row_ends) >= max_rows:
                return None
            row_ends.append(stop)
            rows.append(len(row_ends) - 1)
    return rows


def _fmt_s(v: float) -> str:
    return f"{v:.1f} s" if v < 100 else f"{v:.0f} s"


def plot_timeline(result: RunResult, path: str | os.PathLike[str]) -> None:
    """Draw the run's timeline (node states, dispatcher terms, faults, jobs) to a PNG at ``path``.

    1600x900 pixels. Needs matplotlib (``pip install 'shir[plot]'``).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch, Rectangle
        from matplotlib.ticker import FuncFormatter, MaxNLocator, MultipleLocator
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'shir[plot]'") from exc

    fr = timeline_frames(result)
    end = fr["end_s"] or 1.0
    nodes = sorted(fr["status"]) or ["(no nodes)"]
    for _t, _term, node in result.timeline.get("dispatcher", ()):
        if node is not None and node not in nodes:
            nodes.append(node)
    palette = _DISPATCHER_COLOURS
    node_colour = {n: palette[i % len(palette)] for i, n in enumerate(nodes)}

    width_px, height_px, dpi = 1600, 900, 100
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    axis_px = width_px * 0.86  # the axes' width, for packing labels

    # Fault rows: labelled if they pack into few rows, else bars only, packed by their own length.
    faults = fr["faults"]
    px_s = end / axis_px
    min_w = 3 * px_s  # instant faults (clock_jump, regenerate_key) still get a visible sliver
    labels = [f"{f['kind']} {f['node']}" if f["node"] else f["kind"] for f in faults]
    spans = [(f["start_s"], max(f["end_s"], f["start_s"] + min_w, f["start_s"]
                                + (len(lab) * _LABEL_PX_PER_CHAR + 8) * px_s))
             for f, lab in zip(faults, labels, strict=True)]
    rows = _pack(spans, MAX_FAULT_ROWS)
    show_labels = rows is not None
    if rows is None:
        rows = _pack([(f["start_s"], max(f["end_s"], f["start_s"] + min_w) + px_s)
                      for f in faults], 10_000) or []
    n_fault_rows = max(rows, default=-1) + 1

    lane_rows = len(nodes) + 1
    grid = fig.add_gridspec(
        3, 1, height_ratios=[
            lane_rows * 1.0, min(max(1, n_fault_rows), 8) * (0.55 if show_labels else 0.35) + 0.3,
            3.2,
        ],
        hspace=0.08, left=0.1, right=0.96, top=0.88, bottom=0.12,
    )
    ax_lanes = fig.add_subplot(grid[0])
    ax_faults = fig.add_subplot(grid[1], sharex=ax_lanes)
    ax_jobs = fig.add_subplot(grid[2], sharex=ax_lanes)

    # Faults shaded faintly across every panel, behind everything.
    shade = 0.07 if len(faults) <= 40 else 0.04
    for f in faults:
        colour = FAULT_FAMILIES[_FAMILY_OF.get(f["kind"], "other")][0]
        stop = max(f["end_s"], f["start_s"] + min_w)
        for ax in (ax_lanes, ax_faults, ax_jobs):
            ax.axvspan(f["start_s"], stop, color=colour, alpha=shade, lw=0, zorder=0)

    # --- node lanes: y = 0 .. n-1 for nodes (top first), n for the dispatcher lane
    h = 0.72
    ypos = {n: len(nodes) - 1 - i for i, n in enumerate(nodes)}
    for node in nodes:
        y = ypos[node]
        by_status: dict[str, list[tuple[float, float]]] = {}
        for start, stop, s in fr["status"].get(node, ()):
            by_status.setdefault(s, []).append((start, stop - start))
        for s, bars in by_status.items():
            removed = s == "Removed"
            ax_lanes.broken_barh(
                bars, (y - h / 2, h), facecolors=STATUS_COLOURS.get(s, "#cccccc"),
                edgecolor="#bbbbbb" if removed else "none", hatch="//" if removed else None,
                lw=0, zorder=2,
            )
    y_disp = len(nodes)
    for start, stop, _term, node in fr["dispatcher"]:
        if node is None:
            ax_lanes.broken_barh([(start, stop - start)], (y_disp - h / 2, h), facecolors="white",
                                 edgecolor="#999999", hatch="xx", lw=0, zorder=2)
            continue
        ax_lanes.broken_barh([(start, stop - start)], (y_disp - h / 2, h),
                             facecolors=node_colour[node], zorder=2)
        if (stop - start) / px_s > 8 * len(node) + 10:
            ax_lanes.text((start + stop) / 2, y_disp, node, ha="center", va="center", fontsize=8,
                          color="white", fontweight="bold", zorder=4, clip_on=True)
        if node in ypos:  # thick outline on the holder's own lane
            ax_lanes.add_patch(Rectangle((start, ypos[node] - h / 2 - 0.06), stop - start,
                                         h + 0.12, fill=False, ec="black", lw=2.2, zorder=3))
    # term ticks, labelled where they do not collide
    last_label = -1e18
    for t, term, _node in result.timeline.get("dispatcher", ()):
        ax_lanes.axvline(t, color="black", ls="--", lw=0.8, alpha=0.6, zorder=3)
        if (t - last_label) / px_s >= 26:
            ax_lanes.text(t, y_disp + h / 2 + 0.08, f"T{term}", ha="center", va="bottom",
                          fontsize=8, zorder=4)
            last_label = t
    ax_lanes.set_yticks([*ypos.values(), y_disp], [*ypos, "dispatcher"])
    ax_lanes.set_ylim(-0.6, y_disp + 0.95)
    ax_lanes.tick_params(axis="x", labelbottom=False)
    for spine in ("top", "right"):
        ax_lanes.spines[spine].set_visible(False)

    # --- fault lane
    for f, lab, row in zip(faults, labels, rows, strict=True):
        colour = FAULT_FAMILIES[_FAMILY_OF.get(f["kind"], "other")][0]
        y = n_fault_rows - 1 - row
        w = max(f["end_s"] - f["start_s"], min_w)
        ax_faults.broken_barh([(f["start_s"], w)], (y - 0.35, 0.7), facecolors=colour, alpha=0.85,
                              zorder=2)
        if show_labels:
            ax_faults.text(f["start_s"] + 2 * px_s, y, lab, ha="left", va="center", fontsize=7,
                           zorder=4, clip_on=True,
                           bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none",
                                 "alpha": 0.6})
    ax_faults.set_ylim(-0.6, max(n_fault_rows, 1) - 0.4)
    ax_faults.set_yticks([max(n_fault_rows - 1, 0) / 2],
                         [f"faults ({len(faults)})" if faults else "faults (none)"])
    ax_faults.tick_params(axis="x", labelbottom=False, length=0)
    ax_faults.tick_params(axis="y", length=0)
    for spine in ("top", "right"):
        ax_faults.spines[spine].set_visible(False)

    # --- jobs panel
    s = fr["samples"]
    if s["t_s"]:
        ax_jobs.fill_between(s["t_s"], s["queued"], step="post", color="#4c72b0", alpha=0.35,
                             lw=0, zorder=2)
        ax_jobs.step(s["t_s"], s["queued"], where="post", color="#4c72b0", lw=1.2, zorder=3)
        ax_jobs.step(s["t_s"], s["running"], where="post", color="#222222", lw=1.4, zorder=3)
    ax_jobs.set_ylabel("jobs")
    ax_jobs.set_ylim(bottom=0)
    ax_jobs.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
    ax_jobs.grid(axis="y", alpha=0.3)
    for spine in ("top", "right"):
        ax_jobs.spines[spine].set_visible(False)

    ax_jobs.set_xlim(0, end)
    if end > 1200:  # whole minutes: 1, 2, 5, 10, 15, 30, 60 ... apart
        step = next((m * 60 for m in (1, 2, 5, 10, 15, 30, 60, 120, 240, 480, 1440)
                     if end / (m * 60) <= 16), 2880 * 60)
        ax_jobs.xaxis.set_major_locator(MultipleLocator(step))
        ax_jobs.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v / 60:g}"))
        ax_jobs.set_xlabel("simulated time (min)")
    else:
        ax_jobs.xaxis.set_major_locator(MaxNLocator(nbins=16, steps=[1, 2, 5, 10]))
        ax_jobs.set_xlabel("simulated time (s)")

    # --- title and legend
    j = result.jobs
    verdict = "OK" if result.ok else (
        f"FAILED ({len(result.invariant_violations)} invariant violations, "
        f"{len(result.expectations['failed'])} expectations)"
    )
    fig.suptitle(f"{result.scenario} · seed {result.seed} · {_fmt_s(result.simulated_s)} simulated"
                 f" · {verdict}", fontsize=14, fontweight="bold", y=0.975)
    fig.text(
        0.5, 0.925,
        f"jobs {j.get('completed', 0)}/{j.get('submitted', 0)} completed, "
        f"{j.get('unfinished', 0)} unfinished, {j.get('dead_lettered', 0)} dead-lettered, "
        f"{j.get('lost', 0)} lost · "
        f"failovers {result.failovers} · max dispatcher gap "
        f"{_fmt_s(result.max_dispatcher_gap_s)} · max offline detection "
        f"{_fmt_s(result.max_offline_detect_s)} · {result.events} events",
        ha="center", fontsize=10.5, color="#333333",
    )
    used = {st for ivs in fr["status"].values() for _a, _b, st in ivs}
    handles: list[Any] = [
        Patch(facecolor=c, label=st, hatch="//" if st == "Removed" else None,
              edgecolor="white" if st == "Removed" else c)
        for st, c in STATUS_COLOURS.items() if st in used or st in ("Online", "Limited", "Offline")
    ]
    handles.append(Patch(facecolor="none", edgecolor="black", lw=2, label="is dispatcher"))
    if any(node is None for *_x, node in fr["dispatcher"]):
        handles.append(Patch(facecolor="white", edgecolor="#999999", hatch="xx",
                             label="no dispatcher"))
    fams = {_FAMILY_OF.get(f["kind"], "other") for f in faults}
    handles += [Patch(facecolor=c, alpha=0.85, label=f"fault: {fam}")
                for fam, (c, _k) in FAULT_FAMILIES.items() if fam in fams]
    handles += [
        Patch(facecolor="#4c72b0", alpha=0.35, edgecolor="#4c72b0", label="queued"),
        Line2D([], [], color="#222222", lw=1.4, label="running"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=9,
               frameon=False, bbox_to_anchor=(0.53, 0.0))
    fig.savefig(os.fspath(path), dpi=dpi, format="png")
