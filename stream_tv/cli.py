"""``stream-tv``: the command line. Parses options, calls the API, prints; no maths here.

Errors raised by the library become one line on stderr and an exit code (see the README's
"Exit codes"); a traceback appears only for a bug, and only with ``--debug``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    StreamTVError,
)
from .io.index import parse_dtype
from .io.writer import format_size


class _State:
    debug = False


def _dtype(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    try:
        return parse_dtype(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


def streaming_options(*, nonfinite_default: str) -> Callable:
    """The options every streaming command shares."""

    def decorate(fn: Callable) -> Callable:
        options = [
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
                "--max-shard-size",
                default="5GB",
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
            click.option(
                "--on-nonfinite",
                type=click.Choice(["error", "warn", "ignore"]),
                default=nonfinite_default,
                show_default=True,
                help="What to do when an output chunk holds NaN/Inf.",
            ),
            click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def _run_options(kw: dict[str, Any]):
    from .api import RunOptions

    return RunOptions(
        device=kw.pop("device"),
        chunk_size=kw.pop("chunk_size"),
        max_shard_size=kw.pop("max_shard_size"),
        overwrite=kw.pop("overwrite"),
        progress=not kw.pop("quiet"),
        on_nonfinite=kw.pop("on_nonfinite"),
        restart=kw.pop("restart"),
        space_check=not kw.pop("no_space_check"),
        fsync=kw.pop("fsync"),
    )


def _echo_write_result(result, what: str) -> None:
    speed = f"{result.gb_per_s:.2f} GB/s read" if result.seconds > 0 else ""
    click.echo(
        f"{what}: {result.tensors} tensors, {format_size(result.bytes_written)} in "
        f"{result.shards} shard(s) -> {result.output}  [{result.seconds:.1f} s, {speed}]"
    )
    if result.resumed_shards:
        click.echo(f"resumed: {result.resumed_shards} shard(s) were already complete")
    for name, count in sorted(result.nonfinite.items()):
        click.echo(f"warning: {count} NaN/Inf value(s) in {name}", err=True)


def _result_json(result) -> str:
    from dataclasses import asdict

    def default(o: Any) -> Any:
        return str(o)

    return json.dumps(asdict(result), indent=2, default=default)


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
            if _State.debug:
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
    """
    _State.debug = debug


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def inspect(model: str, as_json: bool) -> None:
    """Tensors, dtypes, shapes, sizes and shards of MODEL, from headers only.

    \b
    Example:
      stream-tv inspect meta-llama/Llama-3.1-8B --json | jq .total_params
    """
    from .api import inspect as do_inspect

    result = do_inspect(model)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    width = max((len(s.name) for s in result.tensors), default=4)
    multi = len(result.files) > 1
    for s in result.tensors:
        shape = "x".join(map(str, s.shape)) or "scalar"
        where = f"  {s.file.name}" if multi else ""
        click.echo(f"{s.name:<{width}}  {s.dtype_str:>5}  {shape:>16}  {format_size(s.nbytes):>10}{where}")
    dtypes = ", ".join(
        f"{k}: {v['tensors']}" for k, v in result.to_dict()["dtypes"].items()
    )
    click.echo(
        f"\n{len(result.tensors)} tensors ({dtypes}), {result.total_params:,} parameters, "
        f"{format_size(result.total_bytes)} in {len(result.files)} file(s)"
    )


@cli.command()
@click.argument("base")
@click.argument("finetuned")
@click.option("-o", "--output", "out", required=True, help="Output directory.")
@click.option(
    "--dtype",
    callback=_dtype,
    help="Storage dtype of the task vector (default float32; float64 for float64 models). "
    "bf16/fp16 lose the low bits of most differences.",
)
@click.option("--skip-unchanged", is_flag=True, help="Leave out tensors equal in both models.")
@click.option(
    "--allow-missing",
    is_flag=True,
    help="Skip tensors present in only one model (listed in the index metadata).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@streaming_options(nonfinite_default="warn")
def extract(base: str, finetuned: str, out: str, as_json: bool, **kw: Any) -> None:
    """Write the task vector FINETUNED - BASE as a sharded safetensors checkpoint.

    Each element is the correctly rounded difference (exact in float32 for bf16/fp16 models
    unless the two values' exponents are more than 16 apart).

    \b
    Example:
      stream-tv extract meta-llama/Llama-3.1-8B ./my-finetune -o ./tv
    """
    from .api import extract_task_vector

    options = _run_options(kw)
    result = extract_task_vector(base, finetuned, out, options=options, **kw)
    if as_json:
        click.echo(_result_json(result))
        return
    _echo_write_result(result, f"task vector ({result.dtype})")
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} unchanged tensor(s)")
    if result.non_float:
        click.echo(f"{len(result.non_float)} non-float tensor(s) equal in both, not written: "
                   + ", ".join(result.non_float[:3]) + (" ..." if len(result.non_float) > 3 else ""))
    if result.missing:
        click.echo(f"{len(result.missing)} tensor(s) in one model only, skipped: "
                   + ", ".join(result.missing[:3]) + (" ..." if len(result.missing) > 3 else ""))
    if result.dtype_mismatches:
        click.echo(f"{len(result.dtype_mismatches)} tensor(s) differ in dtype; computed in float32")


@cli.command()
@click.argument("base")
@click.argument("task_vectors", nargs=-1, required=True, metavar="TV [TV ...]")
@click.option("-o", "--output", "out", required=True, help="Output directory.")
@click.option(
    "--scale",
    "scales",
    multiple=True,
    type=float,
    help="Scale of each task vector, in order (default 1.0; one value applies to all; "
    "negative to subtract).",
)
@click.option("--dtype", callback=_dtype, help="Output dtype (default: the base's).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@streaming_options(nonfinite_default="error")
def apply(base: str, task_vectors: tuple[str, ...], out: str, as_json: bool, **kw: Any) -> None:
    """Write BASE + sum(scale_i * TV_i), in float32, rounded once to the base's dtype.

    \b
    Examples:
      stream-tv apply ./base ./tv -o ./merged                     # base + tv
      stream-tv apply ./base ./tv_a ./tv_b --scale 0.5 --scale 0.3 -o ./mix
      stream-tv apply ./base ./tv --scale -1 -o ./negated         # task negation
    """
    from .api import apply_task_vectors

    options = _run_options(kw)
    kw["scales"] = list(kw["scales"]) or None
    result = apply_task_vectors(base, list(task_vectors), out, options=options, **kw)
    if as_json:
        click.echo(_result_json(result))
        return
    _echo_write_result(result, "model")
    click.echo(f"scales: {', '.join(f'{s:g}' for s in result.scales)}; "
               f"{len(result.untouched)} tensor(s) copied from the base unchanged")


@cli.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, metavar="[ADAPTER ...]")
@click.option(
    "--adapter",
    "adapter_opts",
    multiple=True,
    metavar="ADAPTER",
    help="A PEFT LoRA adapter (directory or Hub id); repeat to merge several, in order. "
    "Same as the positional ADAPTER arguments.",
)
@click.option("-o", "--output", "out", required=True, help="Output directory.")
@click.option(
    "--weight",
    "weights",
    multiple=True,
    type=float,
    help="Weight of each adapter, in order (multiplies its scaling, like PEFT's set_scale; "
    "default 1.0; one value applies to all).",
)
@click.option(
    "--precision",
    type=click.Choice(["exact-peft", "fp32"]),
    default="exact-peft",
    show_default=True,
    help="exact-peft: PEFT's merge_and_unload() bit for bit (on CPU). fp32: add every delta in "
    "float32 and round once (differs only for Embedding LoRA, tied heads and several adapters "
    "on bf16/fp16 models, where PEFT rounds more than once).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@streaming_options(nonfinite_default="error")
def merge(
    base: str,
    adapters: tuple[str, ...],
    adapter_opts: tuple[str, ...],
    out: str,
    as_json: bool,
    **kw: Any,
) -> None:
    """Merge LoRA ADAPTER(s) into BASE, as PEFT's merge_and_unload() + save_pretrained would.

    Streams BASE tensor by tensor, never loading the model. Handles rsLoRA, rank/alpha
    patterns, GPT-2 Conv1D, Embedding LoRA, lora_bias, DoRA, modules_to_save and tied
    embeddings; the config and tokenizer files of BASE are copied, so transformers loads OUT.

    \b
    Examples:
      stream-tv merge meta-llama/Llama-3.1-8B ./my-lora -o ./merged
      stream-tv merge ./base --adapter ./lora_a --adapter ./lora_b --weight 0.7 --weight 0.3 -o ./mix
    """
    from .merge import merge_lora

    if adapters and adapter_opts:
        raise click.UsageError("give adapters either as arguments or with --adapter, not both")
    refs = list(adapters or adapter_opts)
    if not refs:
        raise click.UsageError("no adapter given: stream-tv merge BASE ADAPTER -o OUT")
    options = _run_options(kw)
    result = merge_lora(
        base, refs, out, weights=list(kw.pop("weights")) or None, options=options, **kw
    )
    if as_json:
        click.echo(_result_json(result))
        return
    _echo_write_result(result, "merged model")
    weights = (
        ""
        if all(w == 1.0 for w in result.weights)
        else (" (weights " + ", ".join(f"{w:g}" for w in result.weights) + ")")
    )
    click.echo(
        f"{result.lora_modules} LoRA layer(s) from {len(result.adapters)} adapter(s){weights} "
        f"changed {len(result.merged)} tensor(s); {len(result.replaced)} replaced by tensors "
        f"saved in the adapter; {result.untouched} copied unchanged; precision {result.precision}"
    )


@cli.command("lora-delta")
@click.argument("adapter")
@click.option("-o", "--output", "out", required=True, help="Output directory.")
@click.option(
    "--base",
    help="Base model: base tensor names (tied heads, prefixes), and the deltas that depend on "
    "the base (DoRA, tensors saved in the adapter).",
)
@click.option(
    "--dtype",
    callback=_dtype,
    default="fp32",
    show_default=True,
    help="Storage dtype. fp32 holds PEFT's own delta bits; fp64 computes the products in "
    "float64; bf16/fp16 round each element once.",
)
@click.option(
    "--weight", type=float, default=1.0, show_default=True, help="Multiplies the scaling."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@streaming_options(nonfinite_default="warn")
def lora_delta(adapter: str, out: str, as_json: bool, **kw: Any) -> None:
    """Write ADAPTER's effective delta (scaling * B @ A, in the base's layout) as a task vector.

    Only the tensors the adapter changes are written; `apply` counts the others as zero, so
    `stream-tv apply BASE DELTA` merges it, rounding once (give --base so that the names are
    the base's).

    \b
    Examples:
      stream-tv lora-delta ./my-lora -o ./lora-tv
      stream-tv lora-delta ./my-dora --base meta-llama/Llama-3.1-8B --dtype fp64 -o ./dora-tv
    """
    from .merge import lora_delta as do_lora_delta

    options = _run_options(kw)
    result = do_lora_delta(adapter, out, options=options, **kw)
    if as_json:
        click.echo(_result_json(result))
        return
    _echo_write_result(result, f"LoRA delta ({result.dtype})")
    if result.replaced:
        click.echo(
            f"{len(result.replaced)} tensor(s) saved in the adapter: written as saved - base"
        )


@cli.command()
@click.option("--base", help="Base model (T = finetuned - base; DoRA adapters need it).")
@click.option("--finetuned", help="Fine-tuned or merged model.")
@click.option("--adapter", help="PEFT LoRA adapter whose delta L is compared with T.")
@click.option(
    "--task-vector",
    "task_vectors",
    multiple=True,
    help="A task vector written by `extract`, instead of --finetuned; twice to compare two.",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), help="Write a Markdown report here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG plot here (needs matplotlib).")
@click.option("--worst", default=5, show_default=True, help="Worst tensors listed in the terminal.")
@click.option("--allow-missing", is_flag=True, help="Skip tensors present in only one model.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--chunk-size", default=None, metavar="SIZE", help="Bytes per chunk in flight, e.g. 64MB.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def compare(
    base: str | None,
    finetuned: str | None,
    adapter: str | None,
    task_vectors: tuple[str, ...],
    json_path: str | None,
    md_path: str | None,
    plot_path: str | None,
    worst: int,
    allow_missing: bool,
    device: str,
    chunk_size: str | None,
    quiet: bool,
) -> None:
    """Compare a LoRA delta (scaling * B @ A) with the task vector of the model it produced.

    Per tensor: cosine, max/mean |L - T|, relative error, norms, and how much of the
    difference the finetuned dtype's rounding explains; plus coverage: what the adapter
    covers, what changed outside it, what changed only by dtype rounding.

    \b
    Examples:
      stream-tv compare --base ./base --finetuned ./merged --adapter ./lora --json r.json
      stream-tv compare --task-vector ./tv --adapter ./lora --markdown r.md
      stream-tv compare --task-vector ./tv_a --task-vector ./tv_b
    """
    from pathlib import Path

    from .api import RunOptions
    from .compare import compare as do_compare
    from .errors import OutputError

    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.UsageError(
                "--plot needs matplotlib: pip install 'stream-tv[plot]'"
            ) from None
    # Refuse a report path that cannot be written before streaming the models, not after.
    for flag, path in (("--json", json_path), ("--markdown", md_path), ("--plot", plot_path)):
        if path is not None and not Path(path).absolute().parent.is_dir():
            raise OutputError(
                f"{flag} {path}: the directory {Path(path).absolute().parent} does not exist"
            )
    options = RunOptions(device=device, chunk_size=chunk_size, progress=not quiet)
    report = do_compare(
        base=base,
        finetuned=finetuned,
        adapter=adapter,
        task_vectors=task_vectors,
        allow_missing=allow_missing,
        options=options,
    )
    click.echo(report.render_terminal(worst=worst))
    writers = (
        (json_path, lambda p: Path(p).write_text(report.to_json())),
        (md_path, lambda p: Path(p).write_text(report.to_markdown())),
        (plot_path, report.plot),
    )
    for path, write in writers:
        if path:
            try:
                write(path)
            except OSError as e:
                raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
            click.echo(f"wrote {path}")


@cli.command()
@click.argument("out")
@click.option("--base", help="Recompute from this base (extract, apply, merge outputs).")
@click.option("--finetuned", help="Recompute an extract output from BASE and this model.")
@click.option(
    "--task-vector",
    "task_vectors",
    multiple=True,
    metavar="TV",
    help="Recompute an apply output from BASE and these task vectors (in order; the "
    "scales are read from the output's index).",
)
@click.option("--adapter", help="Recompute a merge output from BASE and this LoRA adapter.")
@click.option(
    "--atol",
    type=float,
    default=0.0,
    show_default=True,
    help="Largest accepted |output - recomputation| (0: the bytes must be identical).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--chunk-size", default=None, metavar="SIZE", help="Bytes per chunk, e.g. 64MB.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def verify(out: str, as_json: bool, quiet: bool, **kw: Any) -> None:
    """Check that OUT is a finished, sound checkpoint; with its inputs, recompute it.

    Checks that the index and the shards agree (files, headers, tensors, total_size), the
    crc32 of every shard against the one recorded when it was written, and that no tensor
    holds NaN/Inf; with inputs, recomputes every tensor in one streaming pass and lists the
    ones that differ. Exit code 0 when sound, 3 with the list of problems otherwise.

    \b
    Examples:
      stream-tv verify ./tv
      stream-tv verify ./tv --base ./base --finetuned ./my-finetune
      stream-tv verify ./mix --base ./base --task-vector ./tv_a --task-vector ./tv_b
    """
    from .errors import VerificationError
    from .verify import verify_output

    result = verify_output(out, progress=not quiet and not as_json, **kw)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    elif result.ok:
        click.echo(result.summary())
    if not result.ok:
        for problem in result.problems:
            click.echo(f"  - {problem}", err=True)
        raise VerificationError(
            f"verification failed: {len(result.problems)} problem(s), listed above", where=out
        )


@cli.command()
@click.argument("directory", default="stream-tv-demo")
@click.option("--overwrite", is_flag=True, help="Replace DIRECTORY if it is not empty.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def demo(directory: str, overwrite: bool, quiet: bool) -> None:
    """Make a small example and run the main job on it.

    Writes a Llama-shaped bf16 base model (4 layers, several shards) and a LoRA adapter
    into DIRECTORY, merges the adapter (PEFT-exact), extracts the task vector of the merged
    model, and compares the adapter's delta with it (report.json, report.md).

    \b
    Example:
      stream-tv demo ./stream-tv-demo
    """
    from .api import RunOptions
    from .demo import run_demo

    result = run_demo(directory, overwrite=overwrite, options=RunOptions(progress=not quiet))
    root = result.directory
    click.echo(f"base model and LoRA adapter: {root / 'base'}, {root / 'adapter'}")
    _echo_write_result(result.merge, "merged model")
    _echo_write_result(result.extract, f"task vector ({result.extract.dtype})")
    click.echo("")
    click.echo(result.report.render_terminal())
    click.echo(f"\nreports: {root / 'report.json'}, {root / 'report.md'}")
    click.echo(
        "next: stream-tv inspect "
        f"{root / 'merged'}; stream-tv verify {root / 'merged'} --base {root / 'base'} "
        f"--adapter {root / 'adapter'}"
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``stream-tv`` console script."""
    cli.main(args=argv, prog_name="stream-tv")


if __name__ == "__main__":
    main()
