"""Every picture of the library: token-weight heatmaps (HTML and PNG) and the F1-vs-documents curves.

Drawing goes through matplotlib's `Figure` and the Agg canvas directly, never pyplot, so nothing here
switches the process's backend or keeps figures alive; PNGs are written atomically (temporary file in the
same folder, then a rename), so a reader never sees half an image.
"""

import html
import math
import os
import tempfile
import warnings
from typing import Sequence

import numpy as np

from camels_jax import io_utils


def _save_png(fig, path: str, dpi="figure") -> None:
  """Writes an Agg `Figure` to `path` atomically."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path), suffix=".png")
  os.close(fd)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # glyphs DejaVu lacks (CJK, emoji) draw as boxes, not errors
      fig.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


# ------------------------------------------------------------------------------------------------
# Token-weight heatmaps.


def token_strings(text: str, offsets: Sequence[tuple[int, int]]) -> list[str]:
  """Display text of each token: its span, minus characters an earlier token already showed.

  Byte tokens that share one multi-byte character would otherwise each show it (or decode alone to
  U+FFFD); this way the pieces concatenate back to the text.
  """
  pieces, shown = [], 0
  for start, end in offsets:
    pieces.append(text[max(start, shown):end])
    shown = max(shown, end)
  return pieces


# White -> yellow -> orange-red (matplotlib's YlOrRd ends): dark text stays legible on every stop.
_STOPS = np.array([[255, 255, 255], [254, 217, 118], [253, 141, 60], [227, 26, 28]], np.float64)


def _colour(x: float) -> tuple[int, int, int]:
  """RGB of a weight scaled to [0, 1]."""
  x = min(max(float(x), 0.0), 1.0) * (len(_STOPS) - 1)
  i = min(int(x), len(_STOPS) - 2)
  rgb = _STOPS[i] + (x - i) * (_STOPS[i + 1] - _STOPS[i])
  return tuple(int(round(c)) for c in rgb)


def _scale(w_N: np.ndarray) -> float:
  """Per-document colour scale: methods differ in range (SSM 0/1, TF-IDF ~0.05-0.5, CaMeLS ~0.2)."""
  top = float(np.max(w_N)) if len(w_N) else 0.0
  return top if top > 0 else 1.0


def heatmap_html(tokens_text: Sequence[str], w_L, title: str) -> str:
  """An HTML fragment showing each token on a background coloured by its weight.

  Colours run from white (0) to red (the document's largest weight); hovering a token shows its
  weight. Whitespace and line breaks are kept.

  Args:
    tokens_text: display text of each token (e.g. `token_strings`).
    w_L: weights; entries past len(tokens_text) (padding) are ignored.
    title: heading of the fragment.

  Returns:
    A self-contained `<section>` (inline styles), usable alone or joined by `heatmap_page`.
  """
  w_N = np.asarray(w_L, np.float32)[:len(tokens_text)]
  if len(w_N) < len(tokens_text):
    raise ValueError(f"{len(tokens_text)} tokens but only {len(w_N)} weights")
  top = _scale(w_N)
  spans = []
  for piece, w in zip(tokens_text, w_N):
    r, g, b = _colour(w / top)
    spans.append(f'<span style="background:rgb({r},{g},{b})" title="{w:.4g}">{html.escape(piece)}</span>')
  return (f'<section style="margin:1em 0;max-width:60em">\n'
          f'<h3 style="font-family:sans-serif">{html.escape(title)}</h3>\n'
          f'<p style="font-family:sans-serif;font-size:80%;color:#555">{len(w_N)} tokens; colour '
          f'white = 0 to red = {top:.4g} (max); mean {float(w_N.mean()) if len(w_N) else 0.0:.4g}</p>\n'
          f'<div style="font-family:monospace;white-space:pre-wrap;line-height:1.6;color:#000">'
          f'{"".join(spans)}</div>\n</section>\n')


def heatmap_page(sections: Sequence[str], title: str = "Token weights") -> str:
  """A full HTML page of `heatmap_html` sections."""
  return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
          f'</head>\n<body>\n<h2 style="font-family:sans-serif">{html.escape(title)}</h2>\n'
          + "".join(sections) + "</body></html>\n")


def write_heatmap_html(path: str, docs: Sequence[tuple[Sequence[str], np.ndarray]],
                       titles: Sequence[str], page_title: str = "Token weights") -> None:
  """Writes one HTML page with a heatmap per (token_strs, weights) document, atomically."""
  if len(docs) != len(titles):
    raise ValueError(f"{len(docs)} documents but {len(titles)} titles")
  io_utils.write_atomic(path, heatmap_page([heatmap_html(t, w, title) for (t, w), title
                                            in zip(docs, titles)], page_title))


def _lines(tokens_text: Sequence[str], w_N: np.ndarray, width: int):
  """Lays tokens out in lines of at most `width` characters: lists of (column, text, weight)."""
  lines, line, col = [], [], 0
  for piece, w in zip(tokens_text, w_N):
    piece = piece.replace("\t", " ").replace("\r", "")
    parts = piece.split("\n")
    for k, part in enumerate(parts):
      if k > 0:  # a line break inside the token
        lines.append(line)
        line, col = [], 0
      while part:
        if col >= width or (col > 0 and col + len(part) > width and len(part.lstrip(" ")) <= width):
          # Wrap before a token that would not fit (tokens longer than a line are split).
          lines.append(line)
          line, col = [], 0
        if col == 0 and lines and part.startswith(" ") and len(part) > 1:
          part = part[1:]  # a wrapped line does not start with the token's space
        chunk = part[:width - col]
        line.append((col, chunk, float(w)))
        col += len(chunk)
        part = part[len(chunk):]
  if line:
    lines.append(line)
  return lines


def heatmap_png(path: str, docs: Sequence[tuple[Sequence[str], np.ndarray]], titles: Sequence[str],
                width: int = 100, font_size: float = 9.0, max_lines: int = 40) -> None:
  """Renders the documents' token weights to one PNG (matplotlib, Agg), written atomically.

  Tokens are drawn in a monospaced font on boxes coloured white (0) to red (that document's largest
  weight), one panel per document, wrapped at `width` characters.

  Args:
    path: the .png to write.
    docs: (token display strings, weights) per document; weights past the tokens are ignored.
    titles: one title per document.
    width: characters per line.
    font_size: points.
    max_lines: lines shown per document (longer ones are cut, noted in the title).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.patches import Rectangle

  if len(docs) != len(titles):
    raise ValueError(f"{len(docs)} documents but {len(titles)} titles")
  char_w_in = 0.6 * font_size / 72  # DejaVu Sans Mono advance: 0.6 em
  line_h_in = 1.45 * font_size / 72
  title_h_in = 2.6 * font_size / 72
  layouts = []
  for (tokens_text, w_L), title in zip(docs, titles):
    w_N = np.asarray(w_L, np.float32)[:len(tokens_text)]
    lines = _lines(tokens_text, w_N, width)
    cut = len(lines) > max_lines
    layouts.append((lines[:max_lines], _scale(w_N), title + (" (cut)" if cut else "")))
  fig_w = width * char_w_in + 0.4
  fig_h = sum(title_h_in + max(len(l), 1) * line_h_in for l, _, _ in layouts) + 0.2
  # Figure + FigureCanvasAgg directly: no pyplot, so no global backend switch or figure registry.
  dpi = 110
  fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
  overlap_in = 1.5 / dpi  # each box reaches into the next: pixel snapping left 1px white seams
  FigureCanvasAgg(fig)
  to_x = lambda inches: inches / fig_w
  to_y = lambda inches: 1 - inches / fig_h  # inches from the top -> figure fraction
  y = 0.1
  for lines, top, title in layouts:
    fig.text(to_x(0.2), to_y(y + 0.6 * title_h_in), f"{title}   (white 0 → red {top:.3g})",
             fontsize=font_size + 1, fontweight="bold", va="center", family="sans-serif", parse_math=False)
    y += title_h_in
    for line in lines:
      for col, chunk, w in line:
        x0 = 0.2 + col * char_w_in
        colour = tuple(c / 255 for c in _colour(w / top))
        if w > 0:
          fig.patches.append(Rectangle((to_x(x0), to_y(y + line_h_in)), to_x(len(chunk) * char_w_in + overlap_in),
                                       line_h_in / fig_h, transform=fig.transFigure, facecolor=colour,
                                       edgecolor="none", antialiased=False, zorder=1))
        fig.text(to_x(x0), to_y(y + 0.5 * line_h_in), chunk, fontsize=font_size, family="monospace",
                 va="center", ha="left", zorder=2, parse_math=False)  # "$3 ... $4" is not TeX
      y += line_h_in
    if not lines:
      y += line_h_in
  _save_png(fig, path)


# ------------------------------------------------------------------------------------------------
# F1 against documents adapted on.

# A marker per method as well as a colour, so coinciding curves (common: several weightings reach the same
# F1 on a few questions) stay tellable apart in print and for colour-blind readers.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")


def _point_and_error(mean, lo, hi) -> tuple[float, float, float]:
  """(y, below, above) for errorbar; NaN where a value is missing (the point or bar is not drawn)."""
  y = np.nan if mean is None else float(mean)
  if lo is None or hi is None:
    return y, np.nan, np.nan
  # max(0, .): a percentile interval can in principle sit beside its mean; matplotlib rejects negative bars.
  return y, max(0.0, y - float(lo)), max(0.0, float(hi) - y)


def _errorbar(ax, xs, triples, **style) -> None:
  """One method's points with their bars; `triples` from `_point_and_error`."""
  if triples:
    y, below, above = (np.asarray(v, np.float64) for v in zip(*triples))
    ax.errorbar(xs, y, yerr=np.stack([below, above]), **style)


def _shifts(n_methods: int, docs: Sequence[int]) -> np.ndarray:
  """Horizontal offset of each method's points: together they span half the smallest gap between x points."""
  docs = sorted(set(docs))
  gap = float(min(np.diff(docs))) if len(docs) > 1 else 1.0
  step = 0.5 * gap / max(n_methods, 1)
  return (np.arange(n_methods) - (n_methods - 1) / 2) * step


def _lr_label(lr) -> str:
  return "" if lr is None else f" (lr {lr:g})"


def plot_curves(path: str, results: dict, title: str = "Online adaptation") -> None:
  """F1 on the questions of the documents seen so far, against documents adapted on, as a PNG.

  Each method has its own marker and colour and a small horizontal offset, and every point carries its 95%
  bootstrap interval over questions, so curves that coincide stay visible. When the curve points carry a
  paired comparison with uniform (`vs_uniform`: {"mean", "lo", "hi"}), a second panel shows F1 − uniform
  with its paired interval: differences the first panel's overlapping intervals would hide.

  Args:
    path: the .png to write.
    results: `evaluation.run`'s results: results["methods"][m] has "lr" and "curve", a list of
      {"docs", "f1", "lo", "hi"} (lo/hi may be None) with optional "vs_uniform".
    title: the left panel's title.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  methods = [(m, r) for m, r in results["methods"].items() if r.get("curve")]
  with_diff = any(p.get("vs_uniform") for _, r in methods for p in r["curve"])
  fig = Figure(figsize=(11.5 if with_diff else 6.5, 4.4), dpi=120)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2 if with_diff else 1, squeeze=False)[0]
  docs = sorted({p["docs"] for _, r in methods for p in r["curve"]})
  shifts = _shifts(len(methods), docs)
  for k, (method, r) in enumerate(methods):
    style = dict(marker=_MARKERS[k % len(_MARKERS)], color=f"C{k % 10}", markersize=5, linewidth=1.2,
                 capsize=3, elinewidth=1.0, alpha=0.9)
    xs = [p["docs"] + shifts[k] for p in r["curve"]]
    _errorbar(axes[0], xs, [_point_and_error(p.get("f1"), p.get("lo"), p.get("hi")) for p in r["curve"]],
              label=f"{method}{_lr_label(r.get('lr'))}", **style)
    if with_diff and method != "uniform":
      vs = [p.get("vs_uniform") or {} for p in r["curve"]]
      _errorbar(axes[1], xs, [_point_and_error(v.get("mean"), v.get("lo"), v.get("hi")) for v in vs],
                label=method, **style)
  bottom, top = axes[0].get_ylim()
  axes[0].set_ylim(max(bottom, -0.02), min(top, 1.02))  # F1 lies in [0, 1]: no room for impossible values
  axes[0].set_title(title)
  axes[0].set_ylabel("F1 on their questions (greedy)")
  if with_diff:
    axes[1].axhline(0.0, color="0.4", linewidth=0.9, linestyle="--", label="uniform")
    axes[1].set_title("F1 − uniform (paired, same questions)")
    axes[1].set_ylabel("F1 difference")
  for ax in axes:
    ax.set_xlabel("documents adapted on")
    if docs:
      ax.set_xticks(docs)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.text(0.01, 0.01, "bars: 95% bootstrap interval over questions; points shifted sideways per method",
           fontsize=7, color="0.35")
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  _save_png(fig, path)


def plot_uptake_vs_step(path: str, by_step: dict, title: str = "Uptake against the inner step") -> None:
  """Answer-NLL uptake against the inner step (× the learned one, log scale), one line per weighting, as a PNG.

  Args:
    path: the .png to write.
    by_step: `camels.compare_weightings`' result: {f"{scale:g}": {weighting: {"question_uptake": {"mean",
      "lo", "hi"}, ...}}}; every weighting of a scale mean-matched to the learned weights.
    title: the plot's title.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  scales = sorted(by_step, key=float)
  names = list(by_step[scales[0]])
  fig = Figure(figsize=(6.5, 4.4), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  xs = np.array([float(s) for s in scales])
  for k, name in enumerate(names):
    cis = [by_step[s][name]["question_uptake"] for s in scales]
    _errorbar(ax, xs * (1 + 0.03 * (k - (len(names) - 1) / 2)),
              [_point_and_error(c.get("mean"), c.get("lo"), c.get("hi")) for c in cis],
              marker=_MARKERS[k % len(_MARKERS)], color=f"C{k % 10}", markersize=5, linewidth=1.2, capsize=3,
              elinewidth=1.0, alpha=0.9, label=name)
  ax.axhline(0.0, color="0.4", linewidth=0.9, linestyle="--")
  ax.set_xscale("log", base=2)
  ax.set_xticks(xs, [f"{x:g}" for x in xs])
  ax.set_xlabel("inner step (× the learned one)")
  ax.set_ylabel("answer NLL before − after (nats)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.text(0.01, 0.01, "bars: 95% bootstrap interval over questions; every weighting mean-matched per document",
           fontsize=7, color="0.35")
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  _save_png(fig, path)


def plot_bank_size(path: str, rows: Sequence[dict], title: str = "MAC against its bank's size") -> None:
  """Answer NLL (left) and F1 (right, with its 95% interval) against the bank's documents (log scale), a line
  per method, as a PNG.

  Args:
    path: the .png to write.
    rows: `report.bank_size_rows`: {"method", "bank_docs", "test": {"nll", "f1", "ci": {"f1": {"lo", "hi"}}}}.
    title: the left panel's title.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(11.5, 4.4), dpi=120)
  FigureCanvasAgg(fig)
  nll_ax, f1_ax = fig.subplots(1, 2)
  methods = list(dict.fromkeys(r["method"] for r in rows))
  for k, method in enumerate(methods):
    mine = [r for r in rows if r["method"] == method]
    xs = np.array([r["bank_docs"] for r in mine], np.float64)
    style = dict(marker=_MARKERS[k % len(_MARKERS)], color=f"C{k % 10}", markersize=5, linewidth=1.2, alpha=0.9)
    nll_ax.plot(xs, [r["test"]["nll"] for r in mine], label=method, **style)
    f1 = [r["test"].get("ci", {}).get("f1", {}) for r in mine]
    _errorbar(f1_ax, xs, [_point_and_error(r["test"]["f1"], c.get("lo"), c.get("hi")) for r, c in zip(mine, f1)],
              capsize=3, elinewidth=1.0, label=method, **style)
  _panels(((nll_ax, "answer NLL (nats per token)", title), (f1_ax, "F1", "F1 on the stream's questions")),
          "documents in the bank (the stream's, then distractors)", log_base=10)
  _save_with_footnote(fig, path, "bars: 95% bootstrap interval over questions")


def _panels(panels, xlabel: str, log_base: int | None = None) -> None:
  """(axes, y label, title) panels sharing an x axis (log-scale with `log_base`), each with a grid and a legend."""
  for ax, ylabel, title in panels:
    if log_base:
      ax.set_xscale("log", base=log_base)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save_with_footnote(fig, path: str, footnote: str) -> None:
  fig.text(0.01, 0.01, footnote, fontsize=7, color="0.35")
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  _save_png(fig, path)


def plot_context_length(path: str, rows: Sequence[dict], title: str = "Memory in weights against memory in "
                        "activations") -> None:
  """Perplexity (left) and wall time (right) against the context length (log scale), static and dynamic
  evaluation, as a PNG; a dynamic point carries the 95% interval of its perplexity ratio to static's.

  Args:
    path: the .png to write.
    rows: {"context", "static": {"ppl", "seconds"}, "dynamic": {"ppl", "seconds", "ppl_lo", "ppl_hi"}}, one per
      context length (the interval keys may be missing or None).
    title: the left panel's title.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(11.5, 4.4), dpi=120)
  FigureCanvasAgg(fig)
  ppl_ax, time_ax = fig.subplots(1, 2)
  xs = np.array([r["context"] for r in rows], np.float64)
  for k, kind in enumerate(("static", "dynamic")):
    style = dict(marker=_MARKERS[k], color=f"C{k}", markersize=5, linewidth=1.2, alpha=0.9, label=kind)
    points = [r[kind] for r in rows]
    _errorbar(ppl_ax, xs, [_point_and_error(p["ppl"], p.get("ppl_lo"), p.get("ppl_hi")) for p in points],
              capsize=3, elinewidth=1.0, **style)
    time_ax.plot(xs, [p["seconds"] for p in points], **style)
  _panels(((ppl_ax, "perplexity on the test articles", title),
           (time_ax, "wall seconds (compiled)", "time to score the test tokens")),
          "context (tokens per window; windows overlap by half)", log_base=2)
  _save_with_footnote(fig, path, "bars: 95% bootstrap interval over tokens of the paired NLL difference, as "
                      "perplexity")


def plot_fwl_training(path: str, history: Sequence[dict], title: str = "FWL training") -> None:
  """Validation perplexity of the FWL model and of the static model (left) and the six learned step sizes
  (right, log scale) against the training step, as a PNG; the best step is marked.

  Args:
    path: the .png to write.
    history: `fwl.fit`'s validation records: {"step", "val_ppl", "val_static_ppl", "eta/<group>", "is_best"}.
    title: the left panel's title.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(11.5, 4.4), dpi=120)
  FigureCanvasAgg(fig)
  ppl_ax, eta_ax = fig.subplots(1, 2)
  steps = [h["step"] for h in history]
  ppl_ax.plot(steps, [h["val_ppl"] for h in history], marker="o", markersize=4, label="FWL")
  ppl_ax.plot(steps, [h["val_static_ppl"] for h in history], linestyle="--", color="0.4", label="static (head off)")
  best = [h for h in history if h.get("is_best")]
  if best:
    b = min(best, key=lambda h: h["val_ppl"])
    ppl_ax.axvline(b["step"], color="C3", alpha=0.5, linewidth=1, label=f"best (step {b['step']})")
  groups = sorted({k.removeprefix("eta/") for h in history for k in h if k.startswith("eta/")})
  for k, g in enumerate(groups):
    eta_ax.plot(steps, [h.get(f"eta/{g}", math.nan) for h in history], marker=_MARKERS[k % len(_MARKERS)],
                markersize=4, label=g)
  eta_ax.set_yscale("log")
  _panels(((ppl_ax, "perplexity on the validation articles", title),
           (eta_ax, "step size (per token, summed losses)", "learned step sizes")), "training step")
  _save_with_footnote(fig, path, "validation: the articles before the test articles; the test articles are "
                      "never read in training")
