"""``extract-lora``: a fine-tune compressed into a PEFT LoRA adapter, and its rank report."""

from __future__ import annotations

import click

from ..options import RunOptions
from .base import cli, dtype_option, run_options


@cli.command("extract-lora")
@click.argument("base")
@click.argument("finetuned")
@click.option("-o", "--output", "out", help="Adapter directory to write (not with --dry-run).")
@click.option(
    "--rank", type=int, help="One LoRA rank for every tensor [default: 16 unless --energy]."
)
@click.option(
    "--energy",
    type=float,
    help="Per tensor the smallest rank keeping this fraction of ||finetuned - base||^2, "
    "in (0, 1], e.g. 0.9; at most --max-rank.",
)
@click.option("--max-rank", type=int, help="Largest rank --energy may choose [default: 64].")
@click.option(
    "--target-modules",
    "target_modules",
    multiple=True,
    metavar="REGEX",
    help="Factorise only the Linear/Conv1D layers whose path ends with a match (PEFT's "
    "rank_pattern rule: 'q_proj', 'self_attn\\..*', 'layers\\.[0-7]\\..*'); repeatable. "
    "Default: all of them.",
)
@click.option(
    "--embeddings",
    type=click.Choice(["lora", "full", "skip"]),
    default="lora",
    show_default=True,
    help="Embedding layers and the output head: as a LoRA, saved whole (modules_to_save), "
    "or left out.",
)
@click.option(
    "--other",
    type=click.Choice(["full", "skip"]),
    default="full",
    show_default=True,
    help="Changed tensors a LoRA cannot hold (norms, a LoRA layer's bias): saved whole "
    "(modules_to_save; bias='lora_only'), or left out (listed).",
)
@click.option(
    "--power-iters",
    type=int,
    default=2,
    show_default=True,
    help="Power iterations of the randomized SVD; each costs two more passes over a tensor.",
)
@click.option(
    "--oversample",
    type=int,
    help="Extra sketch columns beyond the rank [default: max(64, 2 x rank)].",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random sketch.")
@click.option(
    "--dtype",
    callback=dtype_option,
    help="dtype of the LoRA factors [default: the fine-tuned model's].",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    help="Write the full report as JSON here (per tensor: rank, energy, rank profile).",
)
@click.option("--dry-run", is_flag=True, help="Only the report: no adapter is written.")
@click.option("--worst", default=5, show_default=True, help="Worst tensors listed in the terminal.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an adapter in the output directory (an interrupted run is always started "
    "over: a randomized SVD cannot resume).",
)
@click.option("--fsync", is_flag=True, help="Flush the adapter's files to disk before renaming.")
@click.option("--no-space-check", is_flag=True, help="Write even if the disk seems too full.")
@run_options("extract-lora", writes=False)
def extract_lora(
    base: str,
    finetuned: str,
    out: str | None,
    rank: int | None,
    energy: float | None,
    max_rank: int | None,
    target_modules: tuple[str, ...],
    embeddings: str,
    other: str,
    power_iters: int,
    oversample: int | None,
    seed: int,
    dtype,
    report_path: str | None,
    dry_run: bool,
    worst: int,
    options: RunOptions,  # --overwrite, --fsync, --no-space-check land here (run_options)
) -> None:
    """Compress FINETUNED - BASE into a PEFT LoRA adapter, by a streamed randomized SVD.

    Every changed Linear, GPT-2 Conv1D and Embedding weight becomes a LoRA (scaling 1), read
    in row chunks: no tensor is ever held whole, so models larger than memory are fine. Which
    layer is which comes from BASE's model definition (its config.json, with transformers).
    Tensors equal in both models are left out. PEFT loads the adapter
    (PeftModel.from_pretrained) and `stream-tv merge BASE ADAPTER` merges it.

    The report says, per tensor and per module, the rank chosen, the retained energy
    1 - ||T - L||^2 / ||T||^2 of the task vector T, the relative error ||T - L|| / ||T||, the
    leading singular values and the ranks 50/90/99% of the energy need.

    \b
    Examples:
      stream-tv extract-lora ./base ./finetuned -o ./adapter --rank 32
      stream-tv extract-lora ./base ./finetuned -o ./adapter --energy 0.9 --max-rank 128
      stream-tv extract-lora ./base ./finetuned --dry-run --report ranks.json
    """
    from ..commands.extract_lora import extract_lora as do_extract

    if dry_run and out:
        raise click.UsageError("--dry-run writes no adapter: leave out -o")
    if not dry_run and not out:
        raise click.UsageError("give the adapter directory (-o ADAPTER), or --dry-run")
    result = do_extract(
        base,
        finetuned,
        out,
        rank=rank,
        energy=energy,
        max_rank=max_rank,
        target_modules=target_modules,
        embeddings=embeddings,
        other=other,
        power_iters=power_iters,
        oversample=oversample,
        seed=seed,
        dtype=dtype,
        report=report_path,
        dry_run=dry_run,
        options=options,
    )
    click.echo(result.report.render_terminal(worst=worst))
    click.echo(f"layer kinds from {result.report.basis}")
    if report_path:
        click.echo(f"wrote {report_path}")
