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

from softcache import __version__
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
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo("\ninterrupted; run the same command again to resume", err=True)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]


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
@click.option(
    "--teacher",
    help="Teacher factory, 'package.module:fn' or 'file.py:fn'; returns an nn.Module giving (B, C) logits.",
)
@click.option(
    "--dataset", help="Dataset factory spec; returns a map-style dataset of (input, label) items."
)
@click.option("--output", "-o", help="Where to write the store (a directory).")
@click.option(
    "--encoding",
    type=click.Choice(["dense", "topk"]),
    help="dense keeps all C logits; topk keeps the k largest plus normalisers.  [default: dense]",
)
@click.option(
    "--top-k", "top_k", type=int, help="Entries kept per row with --encoding topk.  [default: 5]"
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "bfloat16", "float32"]),
    help="Stored value type.  [default: float16]",
)
@click.option(
    "--temperatures",
    help="Comma-separated temperatures whose normalisers a topk store keeps.  [default: 1,2,4]",
)
@click.option("--batch-size", type=int, help="Teacher batch size.  [default: 256]")
@click.option("--num-workers", type=int, help="DataLoader worker processes.  [default: 0]")
@click.option("--device", help="auto, cpu, cuda or cuda:N.  [default: auto]")
@click.option("--amp/--no-amp", default=None, help="Autocast the teacher on CUDA.  [default: off]")
@click.option(
    "--shard-rows",
    type=int,
    help="Rows per shard: the unit of writing and of resume.  [default: 4096]",
)
@click.option(
    "--chunk-rows",
    type=int,
    help="Rows per compressed chunk inside a shard.  [default: min(shard-rows, 1024)]",
)
@click.option(
    "--writer-threads", type=int, help="Background threads compressing and writing.  [default: 2]"
)
@click.option(
    "--overwrite", is_flag=True, default=None, help="Replace an existing store at --output."
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="TOML file with any of these options (its [build] table, or top level); options given here win.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_friendly_errors
def build(config_file: str | None, as_json: bool, quiet: bool, **options: Any) -> None:
    """Run the teacher over the dataset and write its logits into a Zarr store.

    Killed or interrupted, the same command resumes where it stopped; the finished store is
    identical to one written in a single run.
    """
    from softcache.build import build as run_build
    from softcache.config import BuildConfig, load_config

    config = load_config(BuildConfig, config_file, options, section="build")
    result = run_build(config, progress=not quiet)
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
        ("time", f"{result.seconds:.2f} s ({result.samples_per_second:,.0f} samples/s)"),
    ]
    click.echo(format_table(rows))


def format_table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":  # pragma: no cover
    main()
