"""Markdown tables from benchmark JSON lines (what docs/benchmarks.md quotes).

    python -m bench.render bench-results/*.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _records(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        out += [r for r in (json.loads(line) for line in Path(p).read_text().splitlines()
                            if line.strip()) if "kind" in r]   # wake_ab.jsonl: A/B pairs only
    return out


def _sizes(rows: list[dict]) -> list[int]:
    return sorted({r["bytes"] for r in rows})


def _fmt_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def allreduce_tables(rows: list[dict]) -> str:
    ar = [r for r in rows if r["kind"] == "allreduce"]
    out = []
    for transport in ("shm", "tcp"):
        sub = [r for r in ar if r["transport"] == transport]
        if not sub:
            continue
        sizes = _sizes(sub)
        ref = {r["bytes"]: r["busbw_GBps"] for r in sub if r["impl"] == "mpi4py"}
        link = "Open MPI vader shared memory" if transport == "shm" else \
            "Open MPI TCP on loopback"
        out += [f"**{transport}** ({link}): bus bandwidth in GB/s; "
                "in brackets, the ratio to mpi4py at the same size.", "",
                "| path | cycle (ms) | " + " | ".join(_fmt_size(s) for s in sizes) + " |",
                "|---|---|" + "---|" * len(sizes)]
        seen = []
        for r in sub:
            key = (r["group"], r["impl"], r["horovod_cycle_time_ms"])
            if key not in seen:
                seen.append(key)
        for group, impl, cycle in seen:
            cells = []
            for s in sizes:
                m = [r for r in sub if (r["group"], r["impl"], r["horovod_cycle_time_ms"]) ==
                     (group, impl, cycle) and r["bytes"] == s]
                if not m:
                    cells.append("")
                    continue
                bw = m[0]["busbw_GBps"]
                ratio = f" ({bw / ref[s]:.2f})" if impl != "mpi4py" and ref.get(s) else ""
                cells.append(f"{bw:.2f}{ratio}")
            label = impl if group in ("mpi", "torch") or group.startswith("harness") \
                else f"{impl} (TF)"
            cycle_txt = "-" if group in ("mpi", "harness-mpi") else str(cycle).replace(
                "default (1)", "1 (default)")
            out.append(f"| {label} | {cycle_txt} | " + " | ".join(cells) + " |")
        lat = {(r["group"], r["impl"], r["horovod_cycle_time_ms"]): r["time_us_median"]
               for r in sub if r["bytes"] == sizes[0]}
        out += ["", f"Latency at {_fmt_size(sizes[0])} (median µs): " + ", ".join(
            f"{impl}{'' if g in ('mpi', 'torch') or g.startswith('harness') else ' (TF)'}"
            f"{'' if g in ('mpi', 'harness-mpi') else f' @{c}'.replace('default (1)', '1')}"
            f" {v:.0f}" for (g, impl, c), v in lat.items()), ""]
    return "\n".join(out)


def simple_table(rows: list[dict], kind: str, columns: list[tuple[str, str]]) -> str:
    sel = [r for r in rows if r["kind"] == kind]
    out = ["| " + " | ".join(c for c, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in sel:
        cells = []
        for _, key in columns:
            v = r
            for part in key.split("."):
                v = v.get(part) if isinstance(v, dict) else None
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def overhead_table(rows: list[dict]) -> str:
    """``harness bench overhead``: wall clock over the same steps (records with ``method =
    "wall"``), or the median step times of the records written before it."""
    sel = [r for r in rows if r["kind"] == "overhead"]
    if not any(r.get("method") == "wall" for r in sel):
        return simple_table(rows, "overhead", [
            ("framework", "framework"), ("ranks", "ranks"), ("model", "model"),
            ("harness step p50 (s)", "harness_step_p50_s"),
            ("bare step p50 (s)", "bare_step_p50_s"), ("ratio median", "ratio.median"),
            ("min", "ratio.min"), ("max", "ratio.max"), ("launches", "launches")])
    out = ["| framework | ranks | harness exchange | timed steps | harness ms/step | "
           "bare ms/step | wall ratio median | min | max | step p50 ratio (median) | "
           "harness outside the step timer (ms/step) | launches |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sel:
        if r.get("method") != "wall":
            continue
        q, p50 = r["ratio"], r["step_p50_ratio"]
        exchange = r.get("harness_grad_exchange")
        # the path its launches took (each pair records it): since allreduce = auto,
        # mpi4py or local for some
        paths = sorted({p["harness_gradient_path"] for p in rows
                        if p["kind"] == "overhead_pair" and p.get("harness_gradient_path")
                        and (p["framework"], p["ranks"], p["model"]) ==
                        (r["framework"], r["ranks"], r["model"])})
        if paths:
            exchange = ", ".join(f"horovod {exchange}" if p == "horovod" else p
                                 for p in paths)
        out.append(f"| {r['framework']} | {r['ranks']} | {exchange} "
                   f"| {r['warmup'] + 1}-{r['steps']} | {r['harness_ms_per_step']:.1f} "
                   f"| {r['bare_ms_per_step']:.1f} | {q['median']:.3f} | {q['min']:.3f} "
                   f"| {q['max']:.3f} | {p50['median']:.3f} "
                   f"| {r['harness_outside_steps_ms']:.2f} | {r['launches']} |")
    return "\n".join(out)


def _changes(e: dict) -> str:
    """An environment record's uncommitted code changes, if any."""
    files = e.get("code_changes", e.get("dirty_files"))
    return f" + uncommitted {', '.join(files)}" if files else ""


def allreduce_target_table(rows: list[dict]) -> str:
    """The interleaved target check; with its per-launch ratios and its start and end
    environment where the records have them."""
    sel = [r for r in rows if r["kind"] == "allreduce_target"]
    if not any("ratios" in r for r in sel):
        return simple_table(rows, "allreduce_target", [
            ("transport", "transport"), ("path", "path"), ("bytes", "bytes"),
            ("busbw / mpi4py (median)", "busbw_vs_mpi4py_median"), ("min", "min"),
            ("max", "max"), ("launch pairs", "launch_pairs")])
    out = ["| transport | path | size | busbw GB/s (median) | mpi4py GB/s (median) | "
           "busbw / mpi4py (median) | min | max | per launch | launches |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sel:
        out.append(f"| {r['transport']} | {r['path']} | {_fmt_size(r['bytes'])} "
                   f"| {r['busbw_GBps_median']:.2f} | {r['mpi4py_busbw_GBps_median']:.2f} "
                   f"| {r['busbw_vs_mpi4py_median']:.3f} | {r['min']:.3f} | {r['max']:.3f} "
                   f"| {' '.join(f'{x:.2f}' for x in r['ratios'])} | {r['launch_pairs']} |")
    envs = [r for r in rows if r["kind"] == "allreduce_target_environment"]
    if envs:
        out += ["", "Target check environment: " + "; ".join(
            f"{e['stage']}: commit {e['git_commit']}" + _changes(e)
            + f", load average {e['loadavg'][0]:.2f}" for e in envs) + "."]
        out += [f"Warning: {w['message']}." for w in rows
                if w["kind"] == "allreduce_target_warning"]
        seen = sorted({f"{r['path']}: " + "/".join(str(e.get("OMPI_MCA_mpi_yield_when_idle"))
                                                   for e in r["env_seen"])
                       for r in rows if r["kind"] == "allreduce_target_sample"})
        out += ["", "OMPI_MCA_mpi_yield_when_idle at the ranks' start (rank 0/rank 1): "
                + ", ".join(seen) + "."]
    return "\n".join(out)


def peers_table(rows: list[dict]) -> str:
    """``harness bench peers``: the harness against each peer, samples/s and ratio spread."""
    out = ["| model | ranks | peer | harness samples/s | peer samples/s | harness/peer median "
           "| min | max | launches |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "peers":
            continue
        q = r["ratio"]
        out.append(f"| {r['model']} | {r['ranks']} | {r['peer']} ({r['framework']}) "
                   f"| {r['harness_samples_per_s']:.0f} | {r['peer_samples_per_s']:.0f} "
                   f"| {q['median']:.3f} | {q['min']:.3f} | {q['max']:.3f} | {r['launches']} |")
    return "\n".join(out)


def allreduce_flat_table(rows: list[dict]) -> str:
    """``harness bench allreduce_flat``: each framework's default exchange against mpi4py."""
    out = ["| path | bytes | busbw / mpi4py (median) | min | max | rounds |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "allreduce_flat":
            q = r["busbw_vs_mpi4py"]
            out.append(f"| {r['impl']} | {_fmt_size(r['bytes'])} | {q['median']:.3f} "
                       f"| {q['min']:.3f} | {q['max']:.3f} | {q['n']} |")
    return "\n".join(out)


def main_job_tables(rows: list[dict]) -> str:
    """``harness bench main_job``: E(2) of the README's main job per launch and its spread, and
    the Horovod idle-cycle A/B (samples/s of 2 ranks, launches interleaved)."""
    out = ["| framework | mode | E(2) median | min | max | launches |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "main_job":
            e = r["scaling_efficiency"]
            out.append(f"| {r['framework']} | {r['mode']} | {e['median']:.3f} | {e['min']:.3f} "
                       f"| {e['max']:.3f} | {e['n']} |")
    out += ["", "| framework | exchange at 2 ranks | step p50 (ms) | samples/s median | min | max "
            "| launches |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "idle_cycle":
            x = r["samples_per_s_total"]
            out.append(f"| {r['framework']} | {r['variant']} | {r['step_time_p50_s'] * 1e3:.2f} "
                       f"| {x['median']:.0f} | {x['min']:.0f} | {x['max']:.0f} "
                       f"| {r['launches']} |")
    return "\n".join(out)


def paths_table(rows: list[dict]) -> str:
    """``harness bench paths``: the main job's samples/s through each gradient path, and
    ``allreduce = auto`` (what it resolved to), as a ratio to Horovod's in the same round."""
    out = ["| framework | ranks | allreduce | ran as | step p50 (ms) | samples/s median "
           "| vs Horovod median | min | max | launches |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "path":
            x, q = r["samples_per_s"], r["ratio_to_horovod"]
            out.append(f"| {r['framework']} | {r['ranks']} | {r['allreduce']} "
                       f"| {', '.join(r['gradient_path'])} | {r['step_time_p50_s'] * 1e3:.2f} "
                       f"| {x['median']:.0f} | {q['median']:.3f} | {q['min']:.3f} "
                       f"| {q['max']:.3f} | {r['launches']} |")
    return "\n".join(out)


def threads_table(rows: list[dict]) -> str:
    """``harness bench threads``: the main job's 1-rank step at one thread and at every core,
    and the ceiling that puts on E(2) (the all-cores step over the 1-thread step)."""
    sel = [r for r in rows if r["kind"] == "threads"]
    cores = sel[0]["cores"]
    out = [f"| framework | 1-rank step p50, 1 thread (ms) | {cores} threads (ms) "
           "| ceiling median | min | max | launches |", "|---|---|---|---|---|---|---|"]
    for r in sel:
        q = r["e2_ceiling"]
        out.append(f"| {r['framework']} | {r['step_time_p50_s_1_thread'] * 1e3:.2f} "
                   f"| {r[f'step_time_p50_s_{cores}_threads'] * 1e3:.2f} | {q['median']:.3f} "
                   f"| {q['min']:.3f} | {q['max']:.3f} | {r['launches']} |")
    return "\n".join(out)


def compression_table(rows: list[dict]) -> str:
    """``harness bench compression``: each method against dense on the slow link (medians).
    "samples/s" is the global batch over the median step; "wall" the training wall time,
    evaluations and averages included (local SGD's averages fall outside its median step, so
    its wall ratio is the one to read)."""
    def f(v, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    out = ["| framework | method | samples/s | vs dense | wall (s) | vs dense | sent/step (KB) "
           "| on the wire (KB) | of dense | final acc | vs dense (points) "
           "| time to dense acc (s) | vs dense | launches |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dense_wall = {r["framework"]: r["train_wall_s"] for r in rows
                  if r["kind"] == "compression_row" and r["method"] == "none"}
    for r in rows:
        if r["kind"] != "compression_row":
            continue
        d = dense_wall.get(r["framework"])
        out.append(f"| {r['framework']} | {r['method']} | {r['samples_per_s']:,.0f} "
                   f"| {r['speed_vs_dense']:.2f} | {r['train_wall_s']:.2f} "
                   f"| {f(d / r['train_wall_s'] if d else None, '.2f')} "
                   f"| {r['sent_bytes_per_step'] / 1e3:,.1f} "
                   f"| {r['nic_tx_bytes_per_step'] / 1e3:,.1f} | {r['bytes_vs_dense']:.3f} "
                   f"| {r['final_acc']:.4f} | {r['acc_points_vs_dense']:+.1f} "
                   f"| {f(r['time_to_dense_acc_s'], '.2f')} "
                   f"| {f(r['time_to_acc_vs_dense'], '.2f')} | {r['launches']} |")
    return "\n".join(out)


def main(paths: list[str]) -> str:
    rows = _records(paths)
    env = [r for r in rows if r["kind"] == "environment"]
    parts = []
    if env:
        e = env[0]
        parts += [f"Environment: {e['cpu']}, {e['cpus']} CPUs, {e['mpi']}; "
                  + ", ".join(f"{k} {v}" for k, v in e["versions"].items())
                  + f"; commit {e['git_commit']}.", ""]
    if any(r["kind"] == "allreduce" for r in rows):
        parts += [allreduce_tables(rows)]
    if any(r["kind"] == "allreduce_target" for r in rows):
        parts += [allreduce_target_table(rows), ""]
    if any(r["kind"] == "overhead" for r in rows):
        parts += [overhead_table(rows), ""]
    if any(r["kind"] == "bookkeeping" for r in rows):
        b = [r for r in rows if r["kind"] == "bookkeeping"][0]
        parts += [f"Harness bookkeeping per step, measured in-process: {b['us_per_step']:.1f} µs"
                  + (" (null backend; not the overhead, which is the wall-clock ratio above)."
                     if any(r.get("method") == "wall" for r in rows) else "."), ""]
    if any(r["kind"] == "scaling" for r in rows):
        parts += [simple_table(rows, "scaling_pair", [
            ("framework", "framework"), ("X(1) samples/s", "x1_samples_per_s"),
            ("X(2) samples/s", "x2_samples_per_s"), ("E(2)", "E2")]), "",
            simple_table(rows, "scaling", [("framework", "framework"), ("E(2) median", "E2.median"),
                                           ("min", "E2.min"), ("max", "E2.max")]), ""]
    if any(r["kind"] == "async_vs_sync" for r in rows):
        parts += [simple_table(rows, "async_vs_sync", [
            ("straggler", "straggler_factor"), ("sync samples/s", "sync_samples_per_s"),
            ("async samples/s", "async_samples_per_s"), ("ratio", "throughput_ratio"),
            ("sync final acc", "sync_final_acc"), ("async final acc", "async_final_acc"),
            ("sync samples to acc", "sync_samples_to_acc"),
            ("async samples to acc", "async_samples_to_acc"), ("samples ratio", "samples_ratio")]),
            ""]
    if any(r["kind"] == "fusion" for r in rows):
        parts += [simple_table(rows, "fusion", [
            ("transport", "transport"), ("fused round (ms)", "fused_round_ms"),
            ("unfused round (ms)", "unfused_round_ms"), ("fused speed-up", "speedup"),
            ("flat buffer round (ms)", "flat_round_ms"),
            ("flat vs unfused", "flat_speedup_vs_unfused")]), ""]
    if any(r["kind"] == "peers" for r in rows):
        parts += [peers_table(rows), ""]
    if any(r["kind"] == "allreduce_flat" for r in rows):
        parts += [allreduce_flat_table(rows), ""]
    if any(r["kind"] == "main_job" for r in rows):
        parts += [main_job_tables(rows), ""]
    if any(r["kind"] == "threads" for r in rows):
        parts += [threads_table(rows), ""]
    if any(r["kind"] == "path" for r in rows):
        parts += [paths_table(rows), ""]
    if any(r["kind"] == "compression_row" for r in rows):
        parts += [compression_table(rows), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
