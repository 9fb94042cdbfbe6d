"""``compare``, ``verify`` and ``demo``."""

from __future__ import annotations

import json

import click

from ..options import RunOptions
from .base import cli, echo_write_result, layout_options, run_options


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
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Write the JSON report here ('-': to stdout, the summary then goes to stderr).",
)
@click.option(
    "--markdown", "md_path", type=click.Path(dir_okay=False), help="Write a Markdown report here."
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help="Write a PNG plot here (needs matplotlib).",
)
@click.option("--worst", default=5, show_default=True, help="Worst tensors listed in the terminal.")
@click.option("--allow-missing", is_flag=True, help="Skip tensors present in only one model.")
@layout_options
@run_options("compare", writes=False, workers=True)
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
    layouts: dict[str, bool],
    options: RunOptions,
) -> None:
    """Compare a LoRA delta (scaling * B @ A) with the task vector of the model it produced.

    Per tensor: cosine, max/mean |L - T|, relative error, norms, and how much of the
    difference the finetuned dtype's rounding explains; plus coverage: what the adapter
    covers, what changed outside it, what changed only by dtype rounding. On CPU the
    tensors are shared among worker processes, one per core (--workers), and with numba
    installed (pip install 'stream-tv[fast]') each block's figures take one compiled pass.

    \b
    Examples:
      stream-tv compare --base ./base --finetuned ./merged --adapter ./lora --json r.json
      stream-tv compare --task-vector ./tv --adapter ./lora --markdown r.md
      stream-tv compare --task-vector ./tv_a --task-vector ./tv_b
      stream-tv compare --base ./base --finetuned ./merged --adapter ./lora --workers 4
    """
    from ..commands.compare import compare as do_compare

    to_stdout = json_path == "-"
    report = do_compare(
        base=base,
        finetuned=finetuned,
        adapter=adapter,
        task_vectors=task_vectors,
        allow_missing=allow_missing,
        json_path=None if to_stdout else json_path,
        markdown_path=md_path,
        plot_path=plot_path,
        layouts=layouts,
        options=options,
    )
    # The report files are written; only then is anything printed, so a closed pipe
    # (`| head -1`) never skips them. With --json -, stdout carries the JSON alone.
    if to_stdout:
        click.echo(report.to_json())
    click.echo(report.render_terminal(worst=worst), err=to_stdout)
    if options.nonfinite_for("compare") == "warn":
        for t in report.tensors:
            if t.nonfinite:
                click.echo(f"warning: {t.nonfinite} NaN/Inf value(s) in {t.name}", err=True)
    for path in (json_path, md_path, plot_path):
        if path and path != "-":
            click.echo(f"wrote {path}", err=to_stdout)


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
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    help="Recompute a merge output from BASE and this LoRA adapter (repeat, in order, for "
    "several), or a lora-delta output from it.",
)
@click.option(
    "--atol",
    type=float,
    default=0.0,
    show_default=True,
    help="Largest accepted |output - recomputation| (0: the bytes must be identical).",
)
@click.option(
    "--structure-only",
    is_flag=True,
    help="Accept an output whose index records no checksums (its bytes are then not checked).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@run_options("verify", writes=False, nonfinite=False, force=False)
def verify(
    out: str,
    base: str | None,
    finetuned: str | None,
    task_vectors: tuple[str, ...],
    adapters: tuple[str, ...],
    atol: float,
    structure_only: bool,
    as_json: bool,
    options: RunOptions,
) -> None:
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
    from dataclasses import replace

    from ..commands.verify import verify_output
    from ..errors import VerificationError

    result = verify_output(
        out,
        base=base,
        finetuned=finetuned,
        task_vectors=task_vectors,
        adapters=adapters,
        atol=atol,
        structure_only=structure_only,
        options=replace(options, progress=options.progress and not as_json),
    )
    if as_json:
        from ..jsonutil import json_safe

        click.echo(json.dumps(json_safe(result.to_dict()), indent=2, allow_nan=False))
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
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an earlier demo in DIRECTORY (only its own files; nothing else is removed).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def demo(directory: str, overwrite: bool, quiet: bool) -> None:
    """Make a small example and run the main job on it.

    Writes a Llama-shaped bf16 base model (4 layers, several shards) and a LoRA adapter
    into DIRECTORY, merges the adapter (PEFT-exact), extracts the task vector of the merged
    model, and compares the adapter's delta with it (report.json, report.md, report.png).

    \b
    Example:
      stream-tv demo ./stream-tv-demo
    """
    from ..commands.demo import run_demo

    result = run_demo(directory, overwrite=overwrite, options=RunOptions(progress=not quiet))
    root = result.directory
    click.echo(f"base model and LoRA adapter: {root / 'base'}, {root / 'adapter'}")
    echo_write_result(result.merge, "merged model")
    echo_write_result(result.extract, f"task vector ({result.extract.dtype})")
    click.echo("")
    click.echo(result.report.render_terminal())
    reports = [root / n for n in ("report.json", "report.md", "report.png")]
    click.echo("\nreports: " + ", ".join(str(p) for p in reports if p.exists()))
    click.echo(
        "next: stream-tv inspect "
        f"{root / 'merged'}; stream-tv verify {root / 'merged'} --base {root / 'base'} "
        f"--adapter {root / 'adapter'}"
    )
