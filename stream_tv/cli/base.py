"""The ``stream-tv`` group, its error handling, and the option bundles commands share."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

from .. import __version__
from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, StreamTVError
from ..options import (
    DEFAULT_MAX_SHARD,
    NONFINITE_CHOICES,
    NONFINITE_DEFAULTS,
    PAGE_CACHE_CHOICES,
    RunOptions,
)
from ..units import format_size


class State:
    debug = False


def dtype_option(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    from ..io.index import parse_dtype

    try:
        return parse_dtype(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


def _nonfinite_help(command: str) -> str:
    default = NONFINITE_DEFAULTS[command]
    what = "the task vector or LoRA delta" if command == "compare" else "an output chunk"
    return f"What to do when {what} holds NaN/Inf [default for {command}: {default}]."


_READ_OPTIONS = [
    click.option(
        "--device",
        default="auto",
        show_default=True,
        help="auto (CUDA when present), cpu, cuda or cuda:N.",
    ),
    click.option(
        "--chunk-size",
        default=None,
        metavar="SIZE",
        help="Bytes per chunk in flight (rows of every input plus the output), e.g. 64MB. "
        "Default: 1/32 of available memory, 8-64 MiB. Peak memory is about 4x this.",
    ),
    click.option(
        "--page-cache",
        type=click.Choice(list(PAGE_CACHE_CHOICES)),
        default="auto",
        show_default=True,
        help="Pages read from the disk and written: keep them cached for the next run, or "
        "drop them once read or written (a model larger than memory, one read once). auto "
        "drops when the inputs and output exceed the memory available (a cgroup limit "
        "included), or on a virtual machine whose balloon hands free pages back to its host "
        "(there the cache is slow to grow). Pages cached before the run stay either way.",
    ),
    click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
]
_WRITE_OPTIONS = [
    click.option(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD,
        show_default=True,
        metavar="SIZE",
        help="Largest output shard (a bigger tensor gets a shard of its own).",
    ),
    click.option("--overwrite", is_flag=True, help="Replace an existing output directory."),
    click.option(
        "--restart",
        is_flag=True,
        help="Discard an interrupted run in the output directory and start over "
        "(by default the same command resumes it).",
    ),
    click.option(
        "--fsync",
        is_flag=True,
        help="Flush each shard to disk before it is renamed (power-loss durability; "
        "costs the time the disk needs to write the output).",
    ),
    click.option(
        "--no-space-check",
        is_flag=True,
        help="Write even if the file system seems to lack the space for the output.",
    ),
]


_FORCE_OPTION = click.option(
    "--force",
    is_flag=True,
    help="Use an input as given even where its index (written by stream-tv) says it is the "
    "wrong kind: a model given as a task vector, an adapter merged in already (apply: or "
    "where its values say so).",
)


_WORKERS_OPTION = click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Processes that share the tensors on CPU (each its own core; every figure is the "
    "same for any N). Default: on Linux, one per core, fewer where memory is short, one "
    "for inputs under 256 MiB.",
)


def run_options(
    command: str,
    *,
    writes: bool = True,
    nonfinite: bool = True,
    force: bool = True,
    workers: bool = False,
) -> Callable:
    """The options streaming commands share, as one ``options: RunOptions`` argument.

    Every command gets ``--device``, ``--chunk-size`` and ``--quiet``; writing commands also
    the output options; ``nonfinite`` adds ``--on-nonfinite`` with ``command``'s default;
    ``force`` adds ``--force``; ``workers`` adds ``--workers`` (a splittable job's).
    """
    bundle = list(_READ_OPTIONS) + (list(_WRITE_OPTIONS) if writes else [])
    if workers:
        bundle.append(_WORKERS_OPTION)
    if force:
        bundle.append(_FORCE_OPTION)
    if nonfinite:
        bundle.append(
            click.option(
                "--on-nonfinite",
                type=click.Choice(list(NONFINITE_CHOICES)),
                default=None,
                help=_nonfinite_help(command),
            )
        )

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def with_options(
            *args: Any,
            device: str,
            chunk_size: str | None,
            quiet: bool,
            page_cache: str = "auto",
            max_shard_size: str = DEFAULT_MAX_SHARD,
            overwrite: bool = False,
            restart: bool = False,
            fsync: bool = False,
            no_space_check: bool = False,
            on_nonfinite: str | None = None,
            force: bool = False,
            workers: int | None = None,
            **kwargs: Any,
        ) -> Any:
            options = RunOptions(
                device=device,
                chunk_size=chunk_size,
                max_shard_size=max_shard_size,
                overwrite=overwrite,
                restart=restart,
                progress=not quiet,
                on_nonfinite=on_nonfinite,  # type: ignore[arg-type]
                space_check=not no_space_check,
                fsync=fsync,
                force=force,
                page_cache=page_cache,
                workers=workers,
            )
            return fn(*args, options=options, **kwargs)

        for option in reversed(bundle):
            with_options = option(with_options)
        return with_options

    return decorate


def layout_options(fn: Callable) -> Callable:
    """``--fan-in-fan-out PATTERN`` / ``--no-fan-in-fan-out PATTERN`` -> ``layouts``."""

    @click.option(
        "--fan-in-fan-out",
        "conv1d",
        multiple=True,
        metavar="PATTERN",
        help="Modules matching PATTERN (a regex on the module path's end, like PEFT's "
        "rank_pattern) are GPT-2 Conv1D layers (weights stored (in, out)). Only needed "
        "without the model definition, for square weights; repeatable.",
    )
    @click.option(
        "--no-fan-in-fan-out",
        "linear",
        multiple=True,
        metavar="PATTERN",
        help="Modules matching PATTERN are Linear layers (weights stored (out, in)).",
    )
    @functools.wraps(fn)
    def with_layouts(*args, conv1d: tuple[str, ...], linear: tuple[str, ...], **kwargs):
        both = set(conv1d) & set(linear)
        if both:
            raise click.UsageError(
                f"pattern {sorted(both)[0]!r} given to both --fan-in-fan-out and "
                "--no-fan-in-fan-out"
            )
        layouts = {**dict.fromkeys(conv1d, True), **dict.fromkeys(linear, False)}
        return fn(*args, layouts=layouts, **kwargs)

    return with_layouts


def echo_write_result(result, what: str) -> None:
    speed = f"{result.gb_per_s:.2f} GB/s read" if result.seconds > 0 else ""
    click.echo(
        f"{what}: {result.tensors} tensors, {format_size(result.bytes_written)} in "
        f"{result.shards} shard(s) -> {result.output}  [{result.seconds:.1f} s, {speed}]"
    )
    if result.resumed_shards:
        click.echo(f"resumed: {result.resumed_shards} shard(s) were already complete")
    for name, count in sorted(result.nonfinite.items()):
        click.echo(f"warning: {count} NaN/Inf value(s) in {name}", err=True)


def result_json(result) -> str:
    """A command's result as strict JSON (the project's one sanitiser)."""
    from dataclasses import asdict

    from ..jsonutil import json_safe

    return json.dumps(json_safe(asdict(result)), indent=2, allow_nan=False)


class _Group(click.Group):
    """Turns library errors into one line on stderr and an exit code, for every command."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except StreamTVError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: rerun the same command to resume", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            ctx.exit(0)
        except Exception as e:  # a bug: say so; the traceback only on request
            if State.debug:
                raise
            click.echo(
                f"internal error: {type(e).__name__}: {e}\n"
                "this is a bug in stream-tv; rerun with --debug for the traceback and report it",
                err=True,
            )
            ctx.exit(EXIT_INTERNAL)


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="stream-tv")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
def cli(debug: bool) -> None:
    """Task vectors, LoRA merges and LoRA-vs-task-vector comparisons, streamed chunk by chunk
    through CPU or GPU: checkpoints larger than RAM are fine.

    MODEL references are a directory (model.safetensors.index.json or *.safetensors), a
    .safetensors file, or a Hugging Face Hub id org/name[@revision].

    \b
    Examples:
      stream-tv demo ./stream-tv-demo              # a small example, end to end
      stream-tv merge org/base ./lora -o ./merged  # PEFT-exact merge, streamed
      stream-tv compare --base org/base --finetuned ./merged --adapter ./lora

    merge, lora-delta, compare and extract-lora read the base's model definition from
    transformers once per model and keep the facts in ~/.cache/stream-tv/model-facts
    ($STREAM_TV_CACHE_DIR; STREAM_TV_FACTS_CACHE=0 turns this off).
    """
    State.debug = debug


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``stream-tv`` console script (see :mod:`stream_tv.console`)."""
    from ..console import main as console_main

    console_main(argv)
