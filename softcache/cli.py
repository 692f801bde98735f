"""The `softcache` command line: thin commands over the library.

Each command turns its options into a config, makes one library call and prints the result. Errors
the user can fix (`SoftcacheError`) become a one-line message and exit code 1; an interrupted command
exits 130 and says how to resume.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from softcache._version import __version__
from softcache.config import BuildConfig, TrainConfig, option_specs
from softcache.errors import SoftcacheError

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _friendly_errors(fn: F) -> F:
    """Turn library errors into click errors: a message, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SoftcacheError as exc:
            raise click.ClickException(_one_line(str(exc))) from exc
        except OSError as exc:
            # Storage and network failures: the message is the user's lead, not a traceback.
            raise click.ClickException(f"I/O error: {type(exc).__name__}: {exc}") from exc
        except KeyboardInterrupt:
            click.echo("\ninterrupted; run the same command again to resume", err=True)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]


def config_options(cls: type, section: str) -> Callable[[F], F]:
    """Click options for every command-line field of a config class (`softcache.config`), plus
    `--config`, `--json`, `--quiet` and `--storage-option`.

    The option, its type, default and help come from the field, so they never drift apart. Every
    option defaults to None ("not given"), so a TOML file's value and then the field's default
    apply.
    """

    def decorate(fn: F) -> F:
        fn = _storage_option(fn)
        fn = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")(fn)
        fn = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(fn)
        fn = click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            help=f"TOML file with any of these options (its [{section}] table, or top level); "
            "options given here win.",
        )(fn)
        for spec in reversed(option_specs(cls)):
            kind = click.Choice(list(spec.type)) if isinstance(spec.type, tuple) else spec.type
            kwargs: dict[str, Any] = {"default": None, "help": spec.help}
            if spec.is_flag:
                if "/" not in spec.flags[0]:  # `--x/--no-x` pairs are flags already
                    kwargs["is_flag"] = True
            else:
                kwargs["type"] = kind
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
            fn = click.option(*spec.flags, spec.name, **kwargs)(fn)
        return fn

    return decorate


def _storage_option(fn: F) -> F:
    return click.option(
        "--storage-option",
        "storage_option",
        multiple=True,
        metavar="KEY=VALUE",
        help="An fsspec option for URL stores (repeatable; dots nest: client_kwargs.region_name=x). "
        "Credentials also come from the environment, as the backend reads them.",
    )(fn)


def _options_from(pairs: tuple[str, ...]) -> dict[str, Any] | None:
    from softcache.store.location import parse_storage_options

    return parse_storage_options(pairs) or None


def _one_line(message: str) -> str:
    """An error raised in a DataLoader worker arrives with the worker's traceback in its message
    (torch re-raises it that way): keep the last line, the error itself, without its class path."""
    if "Traceback (most recent call last)" not in message:
        return message
    last = message.strip().splitlines()[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and "Error" in head else last


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version")
def main() -> None:
    """softcache: run a teacher once, distil students from its cached logits many times.

    \b
    Typical use:
      softcache build --teacher pkg.mod:teacher --dataset pkg.mod:train_set --output teacher.zarr
      softcache train --store teacher.zarr --student pkg.mod:student --dataset pkg.mod:train_set
    """


@main.command(context_settings=CONTEXT)
@config_options(BuildConfig, "build")
@_friendly_errors
def build(
    config_file: str | None,
    as_json: bool,
    quiet: bool,
    storage_option: tuple[str, ...],
    **options: Any,
) -> None:
    """Run the teacher over the dataset and write its logits into a Zarr store.

    Killed or interrupted, the same command resumes where it stopped; the finished store is
    identical to one written in a single run. With --workers or --dask-scheduler the shards are
    computed by Dask workers (a worker that dies has its shards recomputed elsewhere).
    """
    from softcache.builder import build as run_build
    from softcache.config import load_config

    options["storage_options"] = _options_from(storage_option)
    config = load_config(BuildConfig, config_file, options, section="build")
    result = run_build(config, progress=not quiet)
    if config.lm:
        _report_lm_build(result, config, as_json)
        return
    summary = {
        "store": result.store,
        "encoding": config.encoding,
        "samples": result.num_samples,
        "shards": result.shards_total,
        "shards_written": result.shards_written,
        "shards_resumed": result.shards_skipped,
        "bytes_stored": result.bytes_stored,
        "bytes_per_sample": round(result.bytes_per_sample, 2),
        "seconds": round(result.seconds, 3),
        "samples_per_second": round(result.samples_per_second, 1),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    rows = [
        ("store", result.store),
        (
            "encoding",
            config.encoding
            + (f" (k={config.top_k})" if config.encoding == "topk" else "")
            + f", {config.dtype}",
        ),
        ("samples", f"{result.num_samples:,}"),
        (
            "shards",
            f"{result.shards_total} ({result.shards_written} written, {result.shards_skipped} resumed)",
        ),
        ("bytes on disk", f"{result.bytes_stored:,} ({result.bytes_per_sample:,.1f} B/sample)"),
        (
            "time",
            f"{result.seconds:.2f} s ({result.samples_per_second:,.0f} "
            + ("samples/s)" if config.views == 1 else "views/s, teacher rows)"),
        ),
    ]
    click.echo(format_table(rows))


def _report_lm_build(result: Any, config: Any, as_json: bool) -> None:
    from softcache.store import LogitStore

    meta = LogitStore.open(result.store, storage_options=config.storage_options).meta
    codec = meta.codec
    width = f"k={codec.width}" if codec.encoding == "topk" else f"{codec.width} draws"
    values = f"{codec.value_bits}-bit sqrt codes" if codec.value_bits else "float16"
    summary = {
        "store": result.store,
        "encoding": codec.encoding,
        "width": codec.width,
        "vocab_size": codec.vocab_size,
        "samples": result.num_samples,
        "tokens": meta.num_tokens,
        "shards": result.shards_total,
        "shards_written": result.shards_written,
        "shards_resumed": result.shards_skipped,
        "bytes_stored": result.bytes_stored,
        "bytes_per_token": round(result.bytes_stored / meta.num_tokens, 2),
        "seconds": round(result.seconds, 3),
        "tokens_per_second": round(result.samples_per_second, 1),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    rows = [
        ("store", result.store),
        (
            "encoding",
            f"{codec.encoding} ({width}, {values}, ids {codec.ids})"
            if codec.encoding == "topk"
            else f"sampled ({width} at temperature {codec.temperature:g}, ids {codec.ids})",
        ),
        ("vocabulary", f"{codec.vocab_size:,}"),
        ("samples", f"{result.num_samples:,} ({meta.num_tokens:,} tokens)"),
        (
            "shards",
            f"{result.shards_total} ({result.shards_written} written, {result.shards_skipped} resumed)",
        ),
        ("bytes on disk", f"{result.bytes_stored:,} ({summary['bytes_per_token']:,.1f} B/token)"),
        ("time", f"{result.seconds:.2f} s ({result.samples_per_second:,.0f} tokens/s)"),
    ]
    click.echo(format_table(rows))


@main.command(context_settings=CONTEXT)
@config_options(TrainConfig, "train")
@_friendly_errors
def train(
    config_file: str | None,
    as_json: bool,
    quiet: bool,
    storage_option: tuple[str, ...],
    **options: Any,
) -> None:
    """Train a student from a store (offline KD), or a baseline (online KD, hard labels).

    With --lm the student is a causal LM trained per token from a `build --lm` store (top-k with
    its residual bin, or sampled ids: an unbiased KL estimate, at the store's temperature), and
    the evaluation reports perplexity, next-token accuracy and agreement with the teacher.

    Writes a checkpoint each epoch and OUTPUT/metrics.json; --resume continues an interrupted run
    to the same weights an uninterrupted run reaches. Under torchrun (`torchrun --nproc_per_node P
    -m softcache.cli train ...`) each process is one DDP rank: --batch-size is per rank, and rank 0
    reports and writes.

    On a CPU, torch steps the student on a thread per core while the batches are made on another
    core: a small, fast student may step faster with fewer threads (OMP_NUM_THREADS=1 on 2 cores
    took a small MLP's epoch from 274 to 194 ms, but a CNN's from 668 to 773 ms): measure yours.
    """
    from softcache.config import load_config
    from softcache.trainer import train as run_train

    options["storage_options"] = _options_from(storage_option)
    config = load_config(TrainConfig, config_file, options, section="train")
    result = run_train(config, progress=not quiet)
    if not result.main:
        return  # under torchrun, rank 0 reports
    m = result.metrics
    if as_json:
        click.echo(json.dumps({k: v for k, v in m.items() if k != "config"}, indent=2))
        return

    def last(key: str, fmt: str) -> str:
        value = m[key][-1] if m[key] else None
        return "-" if value is None else format(value, fmt)

    if m.get("lm"):
        rows = [
            ("mode", m["mode"]),
            ("epochs", f"{len(m['epoch'])} ({m['steps']} steps)"),
            ("train loss", last("train_loss", ".4f")),
            ("eval perplexity", last("eval_perplexity", ".3f")),
            ("eval bits/token", last("eval_bits_per_token", ".4f")),
            ("next-token accuracy", last("eval_accuracy", ".4f")),
            ("teacher agreement", last("teacher_agreement", ".4f")),
            ("KL to teacher", last("eval_kl_to_teacher", ".4f")),
            ("epoch time", last("epoch_seconds", ".3f") + " s"),
            ("tokens/s", last("tokens_per_second", ",.0f")),
            ("metrics", str(result.output / "metrics.json")),
        ]
        click.echo(format_table(rows))
        return
    rows = [
        ("mode", m["mode"]),
        ("epochs", str(len(m["epoch"]))),
        ("train loss", last("train_loss", ".4f")),
        ("eval accuracy", last("eval_accuracy", ".4f")),
        ("teacher agreement", last("teacher_agreement", ".4f")),
        ("epoch time", last("epoch_seconds", ".3f") + " s"),
        ("samples/s", last("samples_per_second", ",.0f")),
        ("data wait", last("data_wait_fraction", ".1%")),
        ("metrics", str(result.output / "metrics.json")),
    ]
    click.echo(format_table(rows))


@main.command(context_settings=CONTEXT)
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_storage_option
@_friendly_errors
def info(store: str, as_json: bool, storage_option: tuple[str, ...]) -> None:
    """Describe STORE: teacher, dataset, encoding, size, and how far its build got.

    STORE is a folder, file://, s3://bucket/prefix (or any fsspec URL), or a .zip archive.
    """
    from softcache.tools.info import info_rows, store_info

    summary = store_info(store, storage_options=_options_from(storage_option))
    click.echo(json.dumps(summary, indent=2) if as_json else format_table(info_rows(summary)))


@main.command(context_settings=CONTEXT)
@click.argument("store")
@click.option(
    "--dataset", help="Dataset spec: also check every sample hashes to what the teacher saw."
)
@click.option(
    "--expect-digest",
    metavar="DIGEST",
    help="Also require the store's digest (sha256:..., as `info` shows it) to be DIGEST.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_storage_option
@_friendly_errors
def verify(
    store: str,
    dataset: str | None,
    expect_digest: str | None,
    as_json: bool,
    quiet: bool,
    storage_option: tuple[str, ...],
) -> None:
    """Check STORE end to end; exit 0 only if every check passes.

    Checks the metadata against the format, completion, array shapes and dtypes, every object's
    SHA-256 against the store's manifest (a chunk rewritten with a valid checksum is named), every
    chunk's presence and checksum, the dataset fingerprint, and with --dataset every sample hash
    (and, for a --lm store, every sample's length and its offsets). A store written before
    manifests passes on its checksums, with a note that it has no manifest.
    """
    from softcache.tools.verify import verify as run_verify

    report = run_verify(
        store,
        dataset=dataset,
        storage_options=_options_from(storage_option),
        progress=not quiet,
        expect_digest=expect_digest,
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        manifest = report.checked.get("manifest")
        click.echo(
            f"OK  {store}: {report.checked.get('shards', 0)} shards of {len(report.checked.get('arrays', []))} arrays verified"
            + (
                f", {manifest['objects']:,} objects match digest {report.checked['digest']}"
                if manifest
                else ""
            )
            + (
                f", {report.checked['dataset']['num_samples']:,} samples match {dataset}"
                if dataset
                else ""
            )
        )
    else:
        for problem in report.problems:
            click.echo(f"FAIL  {_one_line(problem)}", err=True)
    if not as_json:
        for note in report.notes:
            click.echo(f"NOTE  {note}", err=True)
    if not report.ok:
        raise SystemExit(1)


@main.command(context_settings=CONTEXT)
@click.argument("prefix")
@click.option(
    "--max-depth",
    type=click.IntRange(min=0),
    default=None,
    help="Search at most this many folder levels below PREFIX (1: its direct children). "
    "[default: any depth]",
)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@_storage_option
@_friendly_errors
def ls(prefix: str, max_depth: int | None, as_json: bool, storage_option: tuple[str, ...]) -> None:
    """List the stores at or under PREFIX (a folder or bucket prefix, any depth), a line each.

    Reads metadata only, never soft labels; a damaged store is listed with its error.
    """
    from softcache.tools.info import list_stores, ls_line

    stores = list_stores(prefix, storage_options=_options_from(storage_option), max_depth=max_depth)
    if as_json:
        click.echo(json.dumps(stores, indent=2))
        return
    if not stores:
        click.echo(f"no softcache stores under {prefix}")
    for entry in stores:
        click.echo(ls_line(entry))


@main.command(context_settings=CONTEXT)
@click.argument("stores", nargs=-1, required=True)
@click.option("--output", "-o", required=True, help="Where to write the merged store.")
@click.option(
    "--weights", help="Comma-separated weights, one per store (normalised).  [default: equal]"
)
@click.option(
    "--encoding", type=click.Choice(["dense", "topk"]), default="dense", show_default=True
)
@click.option(
    "--top-k", "top_k", type=int, default=5, show_default=True, help="k with --encoding topk."
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "bfloat16", "float32"]),
    default="float16",
    show_default=True,
)
@click.option(
    "--temperatures", default="1,2,4", show_default=True, help="Normalisers a topk store keeps."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_storage_option
@_friendly_errors
def merge(
    stores: tuple[str, ...],
    output: str,
    weights: str | None,
    encoding: str,
    top_k: int,
    dtype: str,
    temperatures: str,
    overwrite: bool,
    quiet: bool,
    storage_option: tuple[str, ...],
) -> None:
    """Merge STORES of one dataset into an ensemble teacher: the weighted mean of probabilities."""
    from softcache.tools.merge import merge as run_merge

    try:
        w = [float(x) for x in weights.split(",")] if weights else None
        temps = [float(x) for x in temperatures.split(",") if x.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated numbers: {exc}") from exc
    result = run_merge(
        stores,
        output,
        weights=w,
        encoding=encoding,
        top_k=top_k,
        dtype=dtype,
        temperatures=temps,
        overwrite=overwrite,
        storage_options=_options_from(storage_option),
        progress=not quiet,
    )
    click.echo(
        format_table(
            [
                ("store", result.store),
                ("sources", str(result.sources)),
                ("samples", f"{result.num_samples:,}"),
                ("bytes on disk", f"{result.bytes_stored:,}"),
            ]
        )
    )


@main.command(context_settings=CONTEXT)
@click.argument("store")
@click.option(
    "--reference", help="A dense row store of the same data: the full rows to measure against."
)
@click.option("--teacher", help="Teacher spec, run over a sample of --dataset for the full rows.")
@click.option("--dataset", help="The store's dataset spec: inputs for --teacher, labels for ECE.")
@click.option("--rows", type=int, default=2048, show_default=True, help="Rows (tokens) to sample.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the sample.")
@click.option(
    "--temperature",
    type=float,
    help="T of the compared distributions.  [default: 1; a token store's own]",
)
@click.option(
    "--sweep", "do_sweep", is_flag=True, help="Also measure candidate encodings on the sample."
)
@click.option(
    "--max-kl",
    type=float,
    default=0.01,
    show_default=True,
    help="With --sweep: recommend the smallest encoding whose mean KL (nats) is within this.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help="With --sweep: draw the bytes-versus-KL frontier into this PNG file.",
)
@click.option("--device", default="auto", show_default=True, help="Where --teacher runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_storage_option
@_friendly_errors
def fidelity(
    store: str,
    reference: str | None,
    teacher: str | None,
    dataset: str | None,
    rows: int,
    seed: int,
    temperature: float | None,
    do_sweep: bool,
    max_kl: float,
    plot_path: str | None,
    device: str,
    as_json: bool,
    storage_option: tuple[str, ...],
) -> None:
    """How far STORE's soft labels are from the teacher's full rows, on a sample of rows.

    Reports the KL of the stored distribution to the full one (mean, percentiles), top-1
    agreement, the probability mass kept, calibration against the labels (with --dataset) and
    bytes per sample (per token). The full rows come from --reference, or from --teacher run
    over --dataset; a dense store alone is its own reference. --sweep re-encodes the same rows
    in candidate encodings and prints the bytes-versus-KL frontier.
    """
    from softcache.tools.fidelity import fidelity as run_fidelity
    from softcache.tools.sweep import sweep as run_sweep

    if plot_path and not do_sweep:
        raise click.BadParameter("--plot draws the sweep's frontier: pass --sweep too")
    if max_kl <= 0:
        raise click.BadParameter(f"--max-kl must be > 0, got {max_kl}")
    report, ref, opened = run_fidelity(
        store,
        reference=reference,
        teacher=teacher,
        dataset=dataset,
        rows=rows,
        seed=seed,
        temperature=temperature,
        device=device,
        storage_options=_options_from(storage_option),
    )
    if do_sweep:
        meta = opened.meta
        report.sweep = run_sweep(
            ref,
            tokens=meta.tokens,
            temperature=report.temperature,
            max_kl=max_kl,
            codec=meta.codec if meta.tokens else None,
            temperatures=meta.temperatures if meta.encoding == "topk" else (1.0, 2.0, 4.0),
        )
        if plot_path:
            from softcache.tools.plots import plot_frontier

            plot_frontier(
                report.sweep,
                plot_path,
                measured=(
                    f"this store ({report.encoding})",
                    report.data_bytes_per_unit,
                    report.kl_mean,
                ),
                unit=report.unit,
            )
    if as_json:
        out = report.to_dict()
        if plot_path:
            out["plot"] = plot_path
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(format_table(fidelity_rows(report)))
    if report.sweep is not None:
        click.echo()
        click.echo(sweep_table(report.sweep, report.unit))
    if plot_path:
        click.echo(f"frontier plot: {plot_path}")


def fidelity_rows(report: Any) -> list[tuple[str, str]]:
    """`softcache fidelity`'s summary as (name, value) rows."""

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    pct = report.kl_percentiles
    kl = (
        "infinite (undrawn ids have p~ = 0; the sampled loss is unbiased)"
        if report.kl_mean is None
        else f"{report.kl_mean:.5f} nats (p50 {pct['p50']:.5f}, p90 {pct['p90']:.5f}, "
        f"p99 {pct['p99']:.5f})"
    )
    ece = (
        "- (no labels: pass --dataset)"
        if report.ece is None
        else f"{report.ece:.4f} (full rows: {report.ece_reference:.4f}; "
        f"{report.labelled:,} labelled rows)"
    )
    return [
        ("store", f"{report.store} ({report.layout}, {report.encoding})"),
        ("reference", report.reference),
        ("rows measured", f"{report.rows:,} {report.unit}s of {report.samples:,} samples"),
        ("temperature", f"{report.temperature:g}"),
        ("KL(p || p~)", kl),
        ("top-1 agreement", num(report.agreement, ".4f")),
        ("kept mass", num(report.kept_mass, ".4f")),
        ("ECE", ece),
        (
            f"bytes per {report.unit}",
            f"{report.bytes_per_unit:,.1f} (per-row arrays alone: "
            f"{report.data_bytes_per_unit:,.1f})",
        ),
    ]


def sweep_table(sweep: dict[str, Any], unit: str) -> str:
    """The frontier of a sweep (and its sampled candidates), one line each, by bytes."""
    head = f"{'encoding':<18} {'B/' + unit:>9} {'KL mean':>10} {'agreement':>10} {'kept mass':>10}"
    lines = ["bytes-versus-KL frontier (candidates no other beats in both):", head, "-" * len(head)]
    by_label = {c["label"]: c for c in sweep["candidates"]}
    shown = [by_label[label] for label in sweep["frontier"]]
    shown += [c for c in sweep["candidates"] if c["kl_mean"] is None]
    for c in shown:
        kl = "inf" if c["kl_mean"] is None else f"{c['kl_mean']:.5f}"
        lines.append(
            f"{c['label']:<18} {c['bytes_per_unit']:>9.1f} {kl:>10} {c['agreement']:>10.4f} "
            f"{c['kept_mass']:>10.4f}"
        )
    rec = sweep["recommended"]
    lines.append(
        f"recommended (smallest with mean KL <= {sweep['max_kl']:g}): "
        + (rec if rec else "none; raise --max-kl")
    )
    return "\n".join(lines)


@main.command(context_settings=CONTEXT)
@click.argument("run_dirs", nargs=-1, required=True)
@click.option(
    "--output", "-o", required=True, type=click.Path(dir_okay=False), help="The PNG file to write."
)
@click.option("--title", default="", help="The figure's title.")
@_friendly_errors
def plot(run_dirs: tuple[str, ...], output: str, title: str) -> None:
    """Draw the training curves of RUN_DIRS (train --output folders) on one figure.

    One panel each for the training loss, the eval accuracy and the agreement with the teacher,
    per epoch, one line per run. Needs matplotlib (pip install 'softcache[plot]').
    """
    from softcache.tools.plots import plot_runs, read_runs

    path = plot_runs(read_runs(run_dirs), output, title=title)
    click.echo(f"wrote {path}")


@main.command(context_settings=CONTEXT)
@click.argument("store")
@click.argument("registry")
@click.option("--name", required=True, help="The name the store is published under.")
@click.option("--version", "version", required=True, help="The new version (immutable).")
@click.option("--message", help="The commit message. [default: name, version and digest]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_storage_option
@_friendly_errors
def publish(
    store: str,
    registry: str,
    name: str,
    version: str,
    message: str | None,
    as_json: bool,
    storage_option: tuple[str, ...],
) -> None:
    """Publish the complete STORE as VERSION of NAME in REGISTRY (a folder or s3:// prefix).

    Each name is an Icechunk repository (REGISTRY/NAME) and each version an immutable tag: a
    consumer reading icechunk:REGISTRY/NAME@VERSION gets exactly these bytes (this digest)
    whatever is published later. Two publishers of one name at once: one is told of the conflict
    and publishes nothing. Needs the icechunk extra (pip install 'softcache[icechunk]').
    --storage-option applies to the registry and to STORE when it is a URL.
    """
    from softcache.tools.publish import publish as run_publish

    options = _options_from(storage_option)
    result = run_publish(
        store,
        registry,
        name,
        version,
        storage_options=options,
        source_options=options if "://" in store else None,
        message=message,
    )
    summary = {
        "location": result.location,
        "version": result.version,
        "digest": result.digest,
        "snapshot": result.snapshot,
        "objects": result.objects,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(format_table([(k, str(v)) for k, v in summary.items()]))


@main.command(context_settings=CONTEXT)
@click.argument("repository")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@_storage_option
@_friendly_errors
def versions(repository: str, as_json: bool, storage_option: tuple[str, ...]) -> None:
    """List the published versions of REPOSITORY (REGISTRY/NAME), with their digests."""
    from softcache.tools.publish import versions as list_versions

    found = list_versions(repository, _options_from(storage_option))
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo(f"no versions published at {repository}")
    for entry in found:
        click.echo(f"{entry['location']}  {entry['digest']}  {entry['written']}")


@main.command(context_settings=CONTEXT)
@click.argument("published")
@click.argument("output")
@_storage_option
@_friendly_errors
def export(published: str, output: str, storage_option: tuple[str, ...]) -> None:
    """Copy the published version PUBLISHED (icechunk:REGISTRY/NAME@VERSION) out to OUTPUT as a
    plain store, for readers without Icechunk; every object is checked against its manifest."""
    from softcache.tools.publish import export as run_export

    options = _options_from(storage_option)
    digest = run_export(
        published,
        output,
        storage_options=options,
        output_options=options if "://" in output else None,
    )
    click.echo(f"exported {published} to {output} ({digest})")


@main.command("export-axolotl", context_settings=CONTEXT)
@click.argument("store")
@click.option(
    "--dataset",
    required=True,
    help="Dataset spec: the tokenised dataset the store was built from (every sample is checked "
    "against the store's length and hash).",
)
@click.option(
    "--output", "-o", required=True, help="The folder to write (datasets.load_from_disk reads it)."
)
@click.option(
    "--expect-digest",
    metavar="DIGEST",
    help="Refuse the store unless its digest (sha256:..., as `info` shows it) is DIGEST.",
)
@click.option("--overwrite", is_flag=True, help="Replace an earlier export at --output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_storage_option
@_friendly_errors
def export_axolotl(
    store: str,
    dataset: str,
    output: str,
    expect_digest: str | None,
    overwrite: bool,
    as_json: bool,
    storage_option: tuple[str, ...],
) -> None:
    """Write a top-k token STORE as a Hugging Face dataset in axolotl's KD columns.

    Each row is one sample: input_ids, attention_mask, labels (the inputs) and the teacher's
    target_token_ids, target_logprobs (renormalised over the k kept ids) and target_mask, (L, k)
    each, position p holding the distribution of token p (axolotl's kd plugin convention;
    position 0 has no target). Load it with datasets.load_from_disk(OUTPUT), or point axolotl's
    dataset path at it. Needs the `datasets` package; sampled stores have no top-k and are
    refused.
    """
    from softcache.tools.export import export_axolotl_store

    result = export_axolotl_store(
        store,
        dataset,
        output,
        storage_options=_options_from(storage_option),
        expect_digest=expect_digest,
        overwrite=overwrite,
    )
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"exported {result['samples']:,} samples of {store} (top-{result['k']}) to {output} in "
        "axolotl's KD columns"
    )


def format_table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":  # pragma: no cover
    main()
