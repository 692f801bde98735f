"""The tamper table: every reader over stores whose metadata was tampered with, one `zarr.json`
change at a time, each run in its own process under a memory limit.

For every mutation of `tests.helpers.tamper.NAMED` (the cases issue 16 found, and more of each
kind), on a fresh copy of a store of its kind, every reader (`info`, `ls`, `verify`, `train`, `train --expect-digest` pinned to the
untampered store's digest, `merge`, `softcache.open_store`), this prints the exit code, the
message (the `Error:` line, verify's first `FAIL` line, or the last line of a success) and the
reader's peak RSS (with `--compact`, one row per mutation), then a summary: pairs that exited 0
or 1 without a traceback, and the worst peak. The readers run in worker processes under `RLIMIT_AS` (`tests.helpers.tamper.Worker`),
whose peak RSS is reset before each reader (so a peak includes the ~0.4 GB of imports); with
`--isolated`, each (reader, mutation) runs in a fresh process instead (slower: the imports each
time). Usage (from the repository root):

    python scripts/tamper_table.py [--jobs N] [--isolated] [--compact] [--limit-gib 4]
        [--output every-pair.md]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.tamper import (  # noqa: E402
    KINDS,
    MEMORY_LIMIT,
    NAMED,
    READERS,
    Named,
    ReaderOutcome,
    Worker,
    apply_named,
    build_stores,
    run_one,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="readers run at once")
    parser.add_argument("--limit-gib", type=float, default=MEMORY_LIMIT / (1 << 30))
    parser.add_argument("--output", type=Path, help="also write the table here")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--isolated", action="store_true", help="one process per pair")
    parser.add_argument(
        "--compact",
        action="store_true",
        help="print one row per mutation (each reader's exit code, one message, the worst "
        "peak); --output still gets every pair",
    )
    args = parser.parse_args()
    limit = int(args.limit_gib * (1 << 30))
    work = args.work or Path(tempfile.mkdtemp(prefix="softcache-tamper-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pristine = build_stores(work / "pristine")
    import softcache

    digests = {kind: softcache.open_store(str(path)).digest for kind, path in pristine.items()}
    cases = [Named("(none)", kind, "", (), "none") for kind in KINDS] + list(NAMED)
    stores = []
    for i, case in enumerate(cases):
        store = work / f"case{i:02d}" / "store" / f"{case.kind}.zarr"
        shutil.copytree(pristine[case.kind], store)
        if case.op != "none":
            apply_named(store, case)
        stores.append((case, store, work / f"case{i:02d}"))
    results: list[tuple[Named, ReaderOutcome]] = []
    if args.isolated:

        def run(job: tuple) -> tuple[Named, ReaderOutcome]:
            case, reader, store, out = job
            return case, run_one(reader, store, case.kind, out / reader, digests[case.kind], limit)

        jobs = [(c, r, s, o) for c, s, o in stores for r in READERS]
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(run, jobs))
    else:
        lanes = [stores[lane :: args.jobs] for lane in range(args.jobs)]

        def run_lane(lane: list[tuple]) -> list[list[tuple[Named, ReaderOutcome]]]:
            worker = Worker(limit)  # one worker process per lane, its cases in order
            try:
                return [
                    [(case, o) for o in worker.run(store, case.kind, out, digests[case.kind])]
                    for case, store, out in lane
                ]
            finally:
                worker.close()

        with ThreadPoolExecutor(args.jobs) as pool:
            done = list(pool.map(run_lane, lanes))
        for i in range(len(stores)):  # back in case order
            results.extend(done[i % args.jobs][i // args.jobs])
    lines = [
        f"Readers under RLIMIT_AS = {limit / (1 << 30):g} GiB, "
        + (
            "one process per (reader, mutation)"
            if args.isolated
            else f"{args.jobs} worker process(es), peak RSS reset before each reader"
        )
        + f"; {len(results)} pairs, {time.perf_counter() - t0:.0f} s.",
        "",
    ]
    clean = sum(o.clean for _, o in results)
    worst_case, worst = max(results, key=lambda r: r[1].peak_rss)
    tail = [
        "",
        f"{clean} of {len(results)} (reader, store) pairs exited 0 or 1 without a traceback.",
        f"Worst peak RSS: {worst.peak_rss / (1 << 20):.0f} MiB ({worst.reader} on "
        f"'{worst_case.name}', {worst_case.kind}).",
    ]
    full = "\n".join([*lines, *_full(results, work), *tail])
    print("\n".join([*lines, *_compact(results, work), *tail]) if args.compact else full)
    if args.output:  # always every pair
        args.output.write_text(full + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if clean == len(results) else 1


def _message(o: ReaderOutcome, work: Path) -> str:
    message = o.message.replace("|", "\\|").replace(str(work), "W")
    return message if len(message) <= 150 else message[:147] + "..."


def _exit(o: ReaderOutcome) -> str:
    return f"{o.exit_code}" + ("" if o.clean else " **TRACEBACK**")


def _full(results: list[tuple[Named, ReaderOutcome]], work: Path) -> list[str]:
    lines = [
        "| mutation (one zarr.json change) | store | reader | exit | message | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for case, o in results:
        lines.append(
            f"| {case.name} | {case.kind} | {o.reader} | {_exit(o)} | {_message(o, work)} | "
            f"{o.peak_rss / (1 << 20):.0f} MiB |"
        )
    return lines


def _compact(results: list[tuple[Named, ReaderOutcome]], work: Path) -> list[str]:
    """One row per mutation: every reader's exit code, the message of the first reader that
    refused it (info, else verify, else the pinned train), and the worst peak RSS."""
    head = " | ".join(READERS)
    lines = [
        f"| mutation (one zarr.json change) | store | {head} | message | worst peak RSS |",
        "|---|---|" + "---|" * len(READERS) + "---|---|",
    ]
    by_case: dict[str, list[tuple[Named, ReaderOutcome]]] = {}
    for case, o in results:
        by_case.setdefault(f"{case.name}|{case.kind}", []).append((case, o))
    for rows in by_case.values():
        case = rows[0][0]
        outcomes = {o.reader: o for _, o in rows}
        codes = " | ".join(_exit(outcomes[r]) for r in READERS)
        first = next(
            (outcomes[r] for r in ("info", "verify", "train-pinned") if outcomes[r].exit_code),
            outcomes["info"],
        )
        message = f"{first.reader}: {_message(first, work)}" if first.exit_code else "-"
        peak = max(o.peak_rss for o in outcomes.values()) / (1 << 20)
        lines.append(f"| {case.name} | {case.kind} | {codes} | {message} | {peak:.0f} MiB |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
