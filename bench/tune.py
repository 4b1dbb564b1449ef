"""Turn bench/ results into tuning-file entries: which NF4 / LoRA path ``auto`` takes on a GPU model.

Reads the JSON that ``bench/nf4.py`` (eager or ``--timing graph``) and ``bench/lora.py`` wrote, derives
for each file's device the settings that ``bezoar_kernels.tuning`` looks up, and writes them into a
tuning file (the shipped ``kernels/tuning.json`` by default). What each setting is taken from:

* ``nf4.fused_max_m``: the largest measured M up to which the fused forward (its register decode where
  the file timed it) beats dequantize + cuBLAS in time summed over the shapes (0 where it loses at
  M = 1; not set where it loses at a smallest measured M above 1, or where no row has both times);
  forward only, since the backward of an ``auto`` forward never runs fused;
* ``nf4.gemv_max_m``: likewise for the gemv kernel against what ``auto`` would run instead (fused up to
  that fused threshold, dequantize + cuBLAS above it), with the gemv's times at the tiles this file's
  ``--sweep-gemv`` chooses where it timed them; not set where no row has a gemv time;
* ``nf4.tma_min_m``: the smallest measured M from which the ``tma`` kernels (the weight decoded inside
  the K loop) beat dequantize + cuBLAS on every shape, forward and backward, at that M and every larger
  one measured (0 where they lose at the largest M; not set where no row has a tma time);
* ``lora.large_m_path``: of the large-M LoRA paths measured on the same cases (``dequant``, ``cublas``,
  ``concat``, ``tma``), the one with the smallest geometric mean of time over NF4 alone, from the CUDA-graph
  rows where the file has them (GPU time), else the eager rows; runs without dropout are not used
  (``auto`` takes ``merged`` there);
* ``norm_lora.grid``: of the fused RMSNorm + LoRA call's two grids (``persistent``, ``per_block``), timed
  side by side at the largest case of each norm group, the one with the lower sum (graph rows first);
* ``nf4.dequant_cache``: from ``bench/nf4.py --cache`` (a whole run with no variant in error), on where
  the dequant cache's training-step sequences took at least 1% less time than the same with it off,
  summed over the cases;
* ``nf4.fused_swap``: the fused forward's operand order with the register decode (``FusedConfig.swap``,
  W x^T per chunk; false: x W^T) with the lower time summed over the forward rows that timed both
  (``nf4_fused_swap``, ``nf4_fused_xw``); the fused and gemv thresholds are then derived with that order's
  times;
* ``nf4.gemv_pdl``: whether the gemv kernel launches as a programmatic dependent launch, on where the
  rows that timed the same gemv both ways (``nf4_gemv``, ``nf4_gemv_pdl``) take at least 3% less time
  summed over them that way;
* ``nf4.gemv_tiles`` (per swept M) and ``nf4.dequant_launch``: from ``--sweep-gemv`` and
  ``--sweep-dequant``, the one config whose time summed over the shapes is lowest, where it beats the
  heuristic's sum by more than ``--min-gain`` (default 3%); where none does, the setting (or that M's
  tiles) is removed, so the heuristic runs. A gemv config includes its code table (``"nibble"`` and
  ``"prmt"`` are written out; ``"byte"``, the default and what sweeps before the table existed ran, is
  left out). An M whose gemv sweep lacks a shape the file measured, or has a row cut short (``complete``
  false: the run's time limit stopped it), gives no tiles (those on record for that M stay); a dequantize
  sweep marked incomplete (``sweep_dequant_complete`` false) gives nothing.
* A ``bench/nf4.py`` file whose tables were cut short (``cases_complete`` false: its time limit, or a
  run still going) gives no setting at all: a threshold summed over the shapes it reached would differ
  from one over all of them.
* ``lora.merge_launch``: from ``bench/lora.py --sweep-merge``, the merge kernel launch (layout, rows per
  program, warps) with the lowest time summed over the swept shapes and ranks, on the same terms
  (``--min-gain`` over ``lora.DEFAULT_MERGE``'s sum; where none beats it, the setting is removed).
  Tiles are tied to the file's triton release: a file from another release replaces them all.
* ``lora.concat_align``: from ``bench/lora.py --sweep-concat-align``, the multiple the concat forward's
  LoRA columns round up to: the align with the lowest time summed over the rows that timed every align,
  where that sum is at least 1% under align 16's; else 16 (no columns added, so a later run can undo an
  earlier pick). A file with an error in any row (an align whose results differed from align 16's, or
  that failed), or cut short by its budget (its cases come rank by rank: a cut would leave the picks to
  the first rank), gives nothing. The sweep times the concat calls; the fused norm and SwiGLU + LoRA
  calls share their GEMMs and add only the zero stores past the blocks, and are not timed by it.

Files are applied oldest first (by date, then eager before graph timing, then name), so a later run's
value for a setting replaces an earlier one's; settings a file does not measure are kept. Usage::

    python bench/tune.py                                  # every nf4*/lora* file in bench/results
    python bench/tune.py RUN/nf4-graph-*.json RUN/lora-*.json --out my-tuning.json   # then BEZOAR_TUNING=my-tuning.json
    python bench/tune.py --dry-run                        # print what would change, write nothing
    python bench/tune.py RUN/nf4-graph-*.json --keys nf4.gemv_tiles --out t.json   # only the gemv tiles
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SHIPPED = ROOT / "kernels" / "tuning.json"
LARGE_M_CANDIDATES = ("dequant", "cublas", "concat", "tma")


def _kernels_tuning():
    """bezoar_kernels.tuning (imported late so that ``--help`` works before the project is installed)."""
    from bezoar_kernels import tuning

    return tuning


# ----------------------------------------------------------------------------- derivations


def _up_to(ms: list[int], wins) -> int | None:
    """The largest M of ``ms`` (ascending) up to which ``wins(M)`` holds at every M. 0 where it fails at
    M = 1; None where it fails at a smallest measured M above 1 (nothing was measured below it)."""
    best = 0
    for m in ms:
        if not wins(m):
            return best if best or m == 1 else None
        best = m
    return best


def _summed_win(pairs: list[tuple[float, float]]) -> bool:
    """Whether a kernel's times, summed over the shapes of one M (each shape once), beat the alternative's
    sum. A decode step runs every shape, so a win on the total matters more than a win on each shape; the
    plain sum stands in for a step's (which counts the 3B model's four 3200x3200 projections, two
    8640x3200 and one 3200x8640 a layer; weighted so, the H100 runs of 2026-11-27 give the same
    thresholds). Those runs are the case in point: at M = 16 the fused forward lost 3% on 3200x3200 and
    won 36% and 45% on the two larger shapes."""
    return sum(a for a, _ in pairs) < sum(b for _, b in pairs)


def fused_fwd_time(row: dict) -> float | None:
    """The time of the fused forward ``auto`` runs: its register decode ("prmt"), the default for bf16 since
    2026-11-27; files from before that timed it beside the table decode as ``nf4_fused_prmt``."""
    prmt = row.get("nf4_fused_prmt")
    return prmt if prmt is not None else row.get("nf4_fused")


def fused_swap_pick(rows: list[dict]) -> tuple[bool, str] | None:
    """(swap, why): the fused forward's operand order (``FusedConfig.swap``) with the lower time summed over
    the forward rows that timed both (``nf4_fused_swap``, W x^T; ``nf4_fused_xw``, x W^T); None without such
    rows. A tie keeps swap (the fewer instructions in the sm_90 builds)."""
    both = [r for r in rows if r.get("dir") == "fwd" and r.get("nf4_fused_swap") is not None
            and r.get("nf4_fused_xw") is not None]
    if not both:
        return None
    swap, xw = sum(r["nf4_fused_swap"] for r in both), sum(r["nf4_fused_xw"] for r in both)
    return swap <= xw, (f"W x^T {swap:.4f} ms against x W^T {xw:.4f} ms summed over {len(both)} forward rows "
                        f"(M = {', '.join(str(m) for m in sorted({r['M'] for r in both}))})")


PDL_MIN_GAIN = 0.03  # a launch attribute that needs sm_90 and graph support: taken for a gain above noise


def gemv_pdl_pick(rows: list[dict]) -> tuple[bool, str] | None:
    """(on, why): whether the gemv kernel launches as a programmatic dependent launch (``nf4.gemv_pdl``),
    from the forward rows that timed the gemv both ways (``nf4_gemv``, ``nf4_gemv_pdl``: the same config):
    on where the dependent launches' time summed over them is at least ``PDL_MIN_GAIN`` lower; None
    without such rows. The gemv and fused thresholds are derived from the plain launches' times, which
    a dependent launch only shortens."""
    both = [r for r in rows if r.get("dir") == "fwd" and r.get("nf4_gemv") is not None
            and r.get("nf4_gemv_pdl") is not None]
    if not both:
        return None
    plain, pdl = sum(r["nf4_gemv"] for r in both), sum(r["nf4_gemv_pdl"] for r in both)
    return pdl <= plain * (1 - PDL_MIN_GAIN), (
        f"dependent launches {pdl:.4f} ms against plain {plain:.4f} ms summed over {len(both)} forward rows "
        f"(M = {', '.join(str(m) for m in sorted({r['M'] for r in both}))}; on from {PDL_MIN_GAIN:.0%} less)")


def with_fused_order(rows: list[dict]) -> list[dict]:
    """``rows`` (copies where changed) with ``nf4_fused`` the time of the operand order ``fused_swap_pick``
    chooses, where a row timed both orders: the fused time the tuned entry's ``auto`` will run."""
    pick = fused_swap_pick(rows)
    if pick is None:
        return rows
    column = "nf4_fused_swap" if pick[0] else "nf4_fused_xw"
    return [dict(r, nf4_fused=r[column]) if r.get("dir") == "fwd" and r.get(column) is not None
            and r.get("nf4_fused_swap") is not None and r.get("nf4_fused_xw") is not None else r for r in rows]


def fused_fastest_up_to(rows: list[dict]) -> int | None:
    """The largest measured M up to which the fused forward beats dequantize + cuBLAS in time summed over
    the shapes (see ``_up_to``, ``_summed_win``), or None when no forward row has both times. Forward only: the backward of an ``auto``
    forward never runs the fused kernel (``nf4_matmul``'s Directions)."""
    fwd = [r for r in rows if r.get("dir") == "fwd"]
    both = [r for r in fwd if fused_fwd_time(r) is not None and r.get("nf4_dequant") is not None]
    if not both:
        return None

    def wins(m):
        # a shape the fused forward failed on at this M (nf4.py leaves it untimed) is a loss, as gemv's rule
        # has it: judged on the shapes left, a kernel failing on two of three would be taken at that M
        at_m = [r for r in fwd if r["M"] == m]
        if any(fused_fwd_time(r) is None and r.get("nf4_dequant") is not None for r in at_m):
            return False
        # (a run cut between a shape's fused and dequant timings leaves the pair half: not compared)
        return _summed_win([(fused_fwd_time(r), r["nf4_dequant"]) for r in at_m
                            if fused_fwd_time(r) is not None and r.get("nf4_dequant") is not None])

    return _up_to(sorted({r["M"] for r in both}), wins)


def gemv_fastest_up_to(rows: list[dict]) -> int | None:
    """The largest measured M up to which gemv, in time summed over the shapes, is faster than what ``auto``
    would run instead (see ``_up_to``, ``_summed_win``): fused up to the fused threshold these rows give,
    dequantize + cuBLAS above it; a shape the gemv kernel did not take at that M is a loss. None when no
    forward row has a gemv time."""
    fwd = [r for r in rows if r.get("dir") == "fwd"]
    if not any(r.get("nf4_gemv") is not None for r in fwd):
        return None
    fused_max = fused_fastest_up_to(rows) or 0

    def wins(m):
        pairs = []
        for r in (r for r in fwd if r["M"] == m):
            instead = fused_fwd_time(r) if m <= fused_max else r.get("nf4_dequant")
            if r.get("nf4_gemv") is None:
                return False  # the kernel did not take this shape
            if instead is not None:
                pairs.append((r["nf4_gemv"], instead))
        return _summed_win(pairs) if pairs else True

    return _up_to(sorted({r["M"] for r in fwd}), wins)


def _gemv_key(config: dict) -> tuple:
    """A gemv config's tiles, code table and steps, a table left out being the byte table and steps left
    out one range (as sweeps from before either existed ran)."""
    return (config.get("block_n"), config.get("blocks"), config.get("num_warps"), config.get("table", "byte"),
            config.get("steps", 1))


def with_tuned_gemv(rows: list[dict], sweep: list[dict], tiles: dict) -> list[dict]:
    """``rows`` with each forward row's ``nf4_gemv`` replaced by the gemv's time at the tiles the tuning
    entry will hold for its M: ``tiles`` maps M (a string, as ``nf4.gemv_tiles`` holds them) to the config
    the sweep chose, whose time the sweep measured at the row's shape and M, or to None where the sweep
    kept the heuristic, whose time is the sweep's ``default_ms`` (in a file recorded before 2026-11-28, the
    heuristic on the byte table, slower than the ``gather`` lookup that runs now: the threshold it gives
    leans against the gemv). The rows' own gemv times ran whatever tiles the run had (the device's tuning
    entry, or the heuristic); Ms the sweep did not cover keep them."""
    timed = {}
    for r in sweep:
        key = str(r.get("M"))
        if key not in tiles:
            continue
        cfg = tiles[key]
        if cfg is None:
            if r.get("default_ms"):
                timed[(r["shape"], r["M"])] = r["default_ms"]
            continue
        want = _gemv_key(cfg)
        for g in r.get("grid") or []:
            if _gemv_key(g["config"]) == want:
                timed[(r["shape"], r["M"])] = g["ms"]
                break
    out = []
    for r in rows:
        if r.get("dir") == "fwd" and (r["shape"], r["M"]) in timed:
            r = dict(r, nf4_gemv=timed[(r["shape"], r["M"])])
        out.append(r)
    return out


def nf4_auto_time(row: dict, gemv_runs: bool, gemv_max: int, fused_max: int, tma_min: int = 0) -> float | None:
    """The time of what ``auto`` runs for one nf4.py row under these thresholds. ``gemv_runs``: whether the
    forward at the row's shape and M takes gemv (then the backward runs dequant, as ``NF4MatmulFunction``
    does: gemv has no backward; nor does the backward of a fused forward run fused). From ``tma_min`` (0:
    never) the tma kernels, where the row timed them."""
    if row["dir"] == "fwd" and gemv_runs:
        return row.get("nf4_gemv")
    if row["dir"] == "fwd" and row["M"] <= fused_max:
        return fused_fwd_time(row)
    if 0 < tma_min <= row["M"] and row.get("nf4_tma") is not None:
        return row["nf4_tma"]
    return row.get("nf4_dequant")


def tma_fastest_from(rows: list[dict]) -> int | None:
    """The smallest measured M from which the tma kernels beat dequant + cuBLAS on every shape and direction
    timed, at that M and all larger ones; 0 where they lose at the largest M; None without tma times."""
    timed = [r for r in rows if r.get("nf4_tma") is not None and r.get("nf4_dequant") is not None]
    if not timed:
        return None
    ms = sorted({r["M"] for r in timed})
    start = 0
    for m in reversed(ms):
        if all(r["nf4_tma"] < r["nf4_dequant"] for r in timed if r["M"] == m):
            start = m
        else:
            break
    return start


def gemv_runs_at(rows: list[dict], gemv_max: int) -> set[tuple[str, int]]:
    """(shape, M) where ``auto``'s forward takes gemv: M up to the threshold and a gemv time measured (the
    kernel took the shape)."""
    return {(r["shape"], r["M"]) for r in rows
            if r.get("dir") == "fwd" and r["M"] <= gemv_max and r.get("nf4_gemv") is not None}


def lora_auto_time(row: dict, path: str, above: int) -> float | None:
    """The time of ``path`` in a lora.py row where ``auto`` takes the large-M path (M above ``above``, the
    gemv and fused thresholds); None below it."""
    return row.get(f"lora_{path}") if row.get("M", 0) > above else None


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def large_m_path(rows: list[dict]) -> tuple[str, str] | None:
    """(path, why) for lora's large-M "auto": the candidate with the lowest geometric mean of time over
    NF4 alone on the cases where every candidate measured was timed; None when fewer than two were."""
    rows = [r for r in rows if "nf4_only" in r and r.get("nf4_only")]
    present = [p for p in LARGE_M_CANDIDATES if any(r.get(f"lora_{p}") for r in rows)]
    while len(present) >= 2:
        common = [r for r in rows if all(r.get(f"lora_{p}") for p in present)]
        if common:
            means = {p: _geomean([r[f"lora_{p}"] / r["nf4_only"] for r in common]) for p in present}
            best = min(means, key=means.get)
            why = ", ".join(f"{p} {means[p]:.3f}x" for p in present)
            return best, f"geometric mean over NF4 alone on {len(common)} cases: {why}"
        # the candidate timed on the fewest cases is dropped
        present.remove(min(present, key=lambda p: sum(1 for r in rows if r.get(f"lora_{p}"))))
    return None


def norm_grid(rows: list[dict]) -> tuple[str, str] | None:
    """(grid, why) for the norm + LoRA kernels: of the two grids timed at the same case of each norm group,
    the one whose times summed over the groups are lower (persistent on a tie); None if none was timed."""
    pairs = [(r["group"], r.get(f"{r['group']}_lora_fused_persistent"), r.get(f"{r['group']}_lora_fused_per_block"))
             for r in rows if r.get("group")]
    pairs = [(g, a, b) for g, a, b in pairs if a and b]
    if not pairs:
        return None
    persistent, per_block = sum(a for _, a, _ in pairs), sum(b for _, _, b in pairs)
    grid = "per_block" if per_block < persistent else "persistent"
    why = ", ".join(f"{g} {a:.3f} / {b:.3f} ms" for g, a, b in pairs)
    return grid, f"fused norm + LoRA, persistent / one program per row block: {why}"


def gemv_baseline_name(sweep: list[dict]) -> str:
    """What a gemv sweep's ``default_ms`` timed, for the sources text: the heuristic on the lookup its rows
    record (``default_config``, from 2026-11-28); rows without it timed the heuristic on the byte table,
    the default of a GPU without tuned tiles until then (``gather`` since)."""
    tables = {(r.get("default_config") or {}).get("table", "byte") for r in sweep}
    return f"the heuristic's ({', '.join(sorted(tables))} table)"


def _best_config(sweep: list[dict], min_gain: float, keys: tuple[str, ...],
                 defaults: dict | None = None, baseline: str = "the heuristic's") -> tuple[dict | None, str] | None:
    """(config, why): the config (a dict of ``keys``) with the lowest time summed over the sweep's rows, of
    those every row timed, if it beats the rows' summed heuristic by more than ``min_gain``; else (None,
    why): the heuristic stays. None when the sweep timed nothing. ``defaults`` (key -> value) are keys
    that older sweeps did not record (they ran with that value), and that the config leaves out when
    it has that value."""
    defaults = defaults or {}
    rows = [r for r in sweep if r.get("grid") and r.get("default_ms")]
    if not rows:
        return None

    def key_of(g: dict) -> tuple:
        return tuple(g["config"].get(k, defaults[k]) if k in defaults else g["config"][k] for k in keys)

    totals: dict[tuple, float] = {}
    for cfg_key in {key_of(g) for g in rows[0]["grid"]}:
        total = 0.0
        for r in rows:
            t = next((g["ms"] for g in r["grid"] if key_of(g) == cfg_key), None)
            if t is None:
                break
            total += t
        else:
            totals[cfg_key] = total
    if not totals:
        return None
    best = min(totals, key=totals.get)
    default = sum(r["default_ms"] for r in rows)
    why = f"{totals[best]:.4f} ms against {baseline} {default:.4f} ms over {len(rows)} shapes"
    if totals[best] >= default * (1 - min_gain):
        return None, f"best swept config {why}: the heuristic stays"
    return {k: v for k, v in zip(keys, best) if not (k in defaults and v == defaults[k])}, why


def gemv_sweep_whole_ms(result: dict) -> list[int]:
    """The M of a ``bench/nf4.py`` file's gemv sweep (``sweep_gemv``) that it swept whole: a row at every shape
    the file measured (its table rows' and its sweep's), none of them cut short (``complete`` false). A
    sweep stopped by its time limit leaves its last M with a shape missing or a row cut; tiles chosen from
    the shapes it reached could lose on the others."""
    sweep = [r for r in result.get("sweep_gemv") or [] if "M" in r]
    shapes = {r["shape"] for r in result.get("rows", []) if r.get("dir") == "fwd" and "shape" in r}
    shapes |= {r.get("shape") for r in sweep}
    whole = []
    for m in sorted({r["M"] for r in sweep}):
        at_m = [r for r in sweep if r["M"] == m]
        if {r.get("shape") for r in at_m} == shapes and all(r.get("complete") is not False for r in at_m):
            whole.append(m)
    return whole


def derive(result: dict, min_gain: float = 0.03) -> dict[str, tuple[object, str]]:
    """{setting: (value, why)} that one results file supports."""
    out: dict[str, tuple[object, str]] = {}
    bench = result.get("bench", "")
    if bench in ("nf4", "nf4-graph") and result.get("cases_complete") is not False:
        rows = result.get("rows", [])
        swap = fused_swap_pick(rows)
        if swap is not None:
            out["nf4.fused_swap"] = swap
        pdl = gemv_pdl_pick(rows)
        if pdl is not None:
            out["nf4.gemv_pdl"] = pdl
        rows = with_fused_order(rows)  # the thresholds below with the fused order the entry will hold
        smallest = min((r["M"] for r in rows if "M" in r), default=None)
        # tiles: a config per swept M, or None where the sweep found none better than the heuristic; none
        # for an M whose sweep was cut (a shape missing, or a row cut short)
        tiles = {}
        for m in gemv_sweep_whole_ms(result):
            swept = [r for r in result["sweep_gemv"] if r.get("M") == m]
            best = _best_config(swept, min_gain, ("block_n", "blocks", "num_warps", "table", "steps"),
                                {"table": "byte", "steps": 1}, baseline=gemv_baseline_name(swept))
            if best:
                tiles[str(m)] = best
        if tiles:
            out["nf4.gemv_tiles"] = ({m: cfg for m, (cfg, _) in tiles.items()},
                                     "; ".join(f"M = {m}: {why}" for m, (_, why) in tiles.items()))
        # the gemv threshold with the gemv's times at the tiles the entry will hold (chosen, or the heuristic)
        if tiles:
            rows = with_tuned_gemv(rows, result["sweep_gemv"], {m: cfg for m, (cfg, _) in tiles.items()})
        gemv = gemv_fastest_up_to(rows)
        if gemv is not None:
            out["nf4.gemv_max_m"] = (gemv, f"gemv faster than what auto runs instead, summed over the shapes, up to M = {gemv}"
                                     if gemv else f"gemv slower than what auto runs instead at M = {smallest}")
        tma = tma_fastest_from(rows)
        if tma is not None:
            out["nf4.tma_min_m"] = (tma, f"tma beats dequant + cuBLAS on every shape from M = {tma}" if tma
                                    else "dequant + cuBLAS beats tma at the largest M measured on some shape")
        fused = fused_fastest_up_to(rows)
        if fused is not None:
            out["nf4.fused_max_m"] = (fused, f"fused beats dequant + cuBLAS, summed over the shapes, up to M = {fused}" if fused
                                      else f"dequant + cuBLAS beats fused at M = {smallest}, summed over the shapes")
        dequant_sweep = result.get("sweep_dequant") or []
        if result.get("sweep_dequant_complete") is False or any(r.get("complete") is False for r in dequant_sweep):
            dequant_sweep = []  # cut short: a shape it did not reach could want another launch
        best = _best_config(dequant_sweep, min_gain, ("values_per_prog", "num_warps"))
        if best:
            out["nf4.dequant_launch"] = best
    elif bench == "lora-merge-sweep" and result.get("complete"):  # a cut sweep: a shape it missed may want another
        best = _best_config(result.get("rows", []), min_gain, ("layout", "block_n", "num_warps"))
        if best:
            out["lora.merge_launch"] = best
    elif bench == "lora-concat-align" and result.get("complete"):
        align = concat_align_pick(result.get("rows", []))
        if align is not None:
            out["lora.concat_align"] = align
    elif bench == "nf4-cache" and result.get("complete"):
        cache = dequant_cache_on(result.get("rows", []))
        if cache is not None:
            out["nf4.dequant_cache"] = cache
    elif bench == "lora" and (result.get("dropout") or 0) > 0:
        graph = result.get("graph_rows") or []
        picked = large_m_path(graph) if graph else None
        how = "graph replay"
        if picked is None:
            picked, how = large_m_path(result.get("rows", [])), "eager"
        if picked:
            out["lora.large_m_path"] = (picked[0], f"{how}: {picked[1]}")
        grid, how = (norm_grid(graph), "graph replay") if graph else (None, "")
        if grid is None:
            grid, how = norm_grid(result.get("rows", [])), "eager"
        if grid:
            out["norm_lora.grid"] = (grid[0], f"{how}: {grid[1]}")
    return out


CACHE_MIN_GAIN = 0.01  # the dequant cache costs a second buffer: on only for a gain above timing noise
CONCAT_ALIGN_MIN_GAIN = 0.01  # wider concat columns: taken only for a gain above timing noise


def dequant_cache_on(rows: list[dict]) -> tuple[bool, str] | None:
    """(on, why) from ``bench/nf4.py --cache`` rows: on where the cache (its default side-stream priority)
    took at least ``CACHE_MIN_GAIN`` less time than the cache-off dequant path, summed over every row;
    None where a row lacks either time or any variant of any row failed (an error, or results that
    differed from the cache-off ones)."""
    if not rows or any("cache_ms" not in r or "dequant_ms" not in r or any(k.endswith("_error") for k in r)
                       for r in rows):
        return None
    cache, dequant = sum(r["cache_ms"] for r in rows), sum(r["dequant_ms"] for r in rows)
    cublas = sum(r["cublas_ms"] for r in rows)
    why = (f"training-step sequences over {len(rows)} cases: cache {cache:.3f} ms, cache off {dequant:.3f} ms, "
           f"cuBLAS on bf16 weights {cublas:.3f} ms")
    return cache < dequant * (1 - CACHE_MIN_GAIN), why


def concat_align_pick(rows: list[dict]) -> tuple[int, str] | None:
    """(align, why) from ``bench/lora.py --sweep-concat-align`` rows: the align whose time, summed over the
    rows that timed every align the file has, is lowest, where that sum is at least ``CONCAT_ALIGN_MIN_GAIN``
    below align 16's; else 16 (no columns added, which also undoes an earlier pick). None where a row holds
    an error, or no row timed every align (16 among them)."""
    if not rows or any(r.get("errors") for r in rows):
        return None
    aligns = sorted({int(a) for r in rows for a, t in (r.get("ms") or {}).items() if t})
    full = [r for r in rows if all((r.get("ms") or {}).get(str(a)) for a in aligns)]
    if 16 not in aligns or len(aligns) < 2 or not full:
        return None
    sums = {a: sum(r["ms"][str(a)] for r in full) for a in aligns}
    best = min(aligns, key=lambda a: (sums[a], a))
    why = (f"concat forward + backward summed over {len(full)} cases: "
           + ", ".join(f"align {a} {sums[a]:.3f} ms" for a in aligns))
    if best == 16 or sums[best] > sums[16] * (1 - CONCAT_ALIGN_MIN_GAIN):
        return 16, why + f" (none {CONCAT_ALIGN_MIN_GAIN:.0%} under align 16: no columns added)"
    return best, why


def _order(item: tuple[Path, dict]) -> tuple:
    """Oldest first: by date, then by the UTC time a run wrote its file (``time``, written since 2026-11-27;
    files without one count as that day's earliest), eager before graph timing, then the name."""
    path, result = item
    graph = result.get("timing") == "graph" or result.get("bench") == "nf4-graph"
    return (result.get("date", ""), result.get("time", ""), graph, path.name)


def _source(path: Path, result: dict) -> str:
    try:
        shown = path.resolve().relative_to(ROOT)
    except ValueError:
        shown = path
    return f"{shown} ({result.get('commit', 'unknown commit')}, triton {result.get('triton')})"


def _release(version: str | None) -> str | None:
    return ".".join(version.split(".")[:2]) if version else None


def apply(files: list[Path], table: dict, min_gain: float = 0.03, keys=None) -> list[dict]:
    """Fold the settings derived from ``files`` into ``table`` (a parsed tuning file, changed in place);
    returns one change record per setting a file gave. ``keys``: only these settings (default all)."""
    loaded = []
    for path in files:
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"{path}: cannot read the results ({exc})") from None
        if not isinstance(result, dict) or "bench" not in result:
            raise SystemExit(f"{path}: not a bench/ results file (no \"bench\" field)")
        loaded.append((path, result))
    tile_keys = _kernels_tuning().TILE_KEYS
    changes = []
    for path, result in sorted(loaded, key=_order):
        device = result.get("device")
        settings = {k: v for k, v in derive(result, min_gain).items() if keys is None or k in keys}
        if not settings:
            continue
        if not device or device == "cpu":
            raise SystemExit(f"{path}: measured on {device or 'no device'}, not a GPU: nothing to tune from")
        entry = table["devices"].setdefault(device, {"settings": {}, "sources": {}})
        entry.setdefault("sources", {})
        release = _release(result.get("triton"))
        if any(k in tile_keys for k in settings):
            if release is None:
                raise SystemExit(f"{path}: has tile sweeps but no \"triton\" version: tiles need the release "
                                 "they were timed with")
            if entry.get("triton") not in (None, release):
                # tiles of another triton release do not hold next to these: they go
                for key in tile_keys:
                    if key in entry["settings"]:
                        changes.append({"device": device, "setting": key, "old": entry["settings"].pop(key),
                                        "new": None, "file": path.name,
                                        "why": f"timed with triton {entry['triton']}, this run with {release}"})
                    entry["sources"].pop(key, None)
            entry["triton"] = release
        for key, (value, why) in settings.items():
            old = entry["settings"].get(key)
            if key == "nf4.gemv_tiles":  # per M: this run's sweeps replace those M, others stay
                value = {m: cfg for m, cfg in {**(old or {}), **value}.items() if cfg is not None}
                value = dict(sorted(value.items(), key=lambda kv: int(kv[0])))
            if value is None or value == {}:
                entry["settings"].pop(key, None)
                entry["sources"].pop(key, None)
                value = None
            else:
                entry["settings"][key] = value
                entry["sources"][key] = f"{_source(path, result)}: {why}"
            changes.append({"device": device, "setting": key, "old": old, "new": value, "file": path.name,
                            "why": why})
        if not any(k in entry["settings"] for k in tile_keys):
            entry.pop("triton", None)
    return changes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path, help="results JSON (default: bench/results/nf4*.json and lora*.json)")
    p.add_argument("--out", type=Path, default=SHIPPED, help="tuning file to update (default kernels/tuning.json)")
    p.add_argument("--min-gain", type=float, default=0.03,
                   help="a swept tile config replaces the heuristic only if faster by more than this (default 0.03)")
    p.add_argument("--dry-run", action="store_true", help="print the changes, write nothing")
    p.add_argument("--keys", help="comma-separated settings to derive (default all), e.g. nf4.gemv_tiles")
    args = p.parse_args(argv)
    tuning = _kernels_tuning()
    keys = None
    if args.keys:
        keys = {k.strip() for k in args.keys.split(",") if k.strip()}
        unknown = sorted(keys - set(tuning.THRESHOLD_KEYS + tuning.TILE_KEYS))
        if unknown:
            raise SystemExit(f"--keys: unknown setting {', '.join(unknown)} (known: "
                             f"{', '.join(tuning.THRESHOLD_KEYS + tuning.TILE_KEYS)})")
    files = args.files or sorted(f for f in RESULTS.glob("*.json") if f.name.startswith(("nf4", "lora")))
    if args.out.exists():
        try:
            table = tuning.validate(json.loads(args.out.read_text()), str(args.out))
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{args.out}: line {exc.lineno}: not JSON ({exc.msg})") from None
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    else:
        table = {"format": tuning.FORMAT, "devices": {}}
    changes = apply(files, table, args.min_gain, keys)
    for c in changes:
        mark = "unchanged" if c["old"] == c["new"] else f"{c['old']!r} -> {c['new']!r}"
        print(f"{c['device']}: {c['setting']} {mark}  ({c['file']}: {c['why']})")
    if not changes:
        print("no file had a setting to derive")
    try:
        tuning.validate(table, str(args.out))
    except ValueError as exc:  # a results file gave a value the tuning file cannot hold
        raise SystemExit(f"the derived settings are not valid: {exc}") from None
    if args.dry_run:
        return 0
    table["devices"] = dict(sorted(table["devices"].items()))
    args.out.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
