"""The commands that write a checkpoint, and ``inspect``."""

from __future__ import annotations

import json

import click

from ..options import RunOptions
from ..units import format_size
from .base import (
    cli,
    dtype_option,
    echo_write_result,
    layout_options,
    result_json,
    run_options,
)


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def inspect(model: str, as_json: bool) -> None:
    """Tensors, dtypes, shapes, sizes and shards of MODEL, from headers only.

    \b
    Example:
      stream-tv inspect meta-llama/Llama-3.1-8B --json | jq .total_params
    """
    from ..commands.inspect import inspect as do_inspect

    result = do_inspect(model)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    width = max((len(s.name) for s in result.tensors), default=4)
    multi = len(result.files) > 1
    for s in result.tensors:
        shape = "x".join(map(str, s.shape)) or "scalar"
        where = f"  {s.file.name}" if multi else ""
        click.echo(
            f"{s.name:<{width}}  {s.dtype_str:>5}  {shape:>16}  {format_size(s.nbytes):>10}{where}"
        )
    dtypes = ", ".join(f"{k}: {v['tensors']}" for k, v in result.to_dict()["dtypes"].items())
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
    callback=dtype_option,
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
@run_options("extract")
def extract(
    base: str,
    finetuned: str,
    out: str,
    dtype,
    skip_unchanged: bool,
    allow_missing: bool,
    as_json: bool,
    options: RunOptions,
) -> None:
    """Write the task vector FINETUNED - BASE as a sharded safetensors checkpoint.

    Each element is the correctly rounded difference (exact in float32 for bf16/fp16 models
    unless the two values' exponents are more than 16 apart).

    \b
    Example:
      stream-tv extract meta-llama/Llama-3.1-8B ./my-finetune -o ./tv
    """
    from ..commands.extract import extract_task_vector

    result = extract_task_vector(
        base,
        finetuned,
        out,
        dtype=dtype,
        skip_unchanged=skip_unchanged,
        allow_missing=allow_missing,
        options=options,
    )
    if as_json:
        click.echo(result_json(result))
        return
    echo_write_result(result, f"task vector ({result.dtype})")
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} unchanged tensor(s)")
    if result.non_float:
        click.echo(
            f"{len(result.non_float)} non-float tensor(s) equal in both, not written: "
            + ", ".join(result.non_float[:3])
            + (" ..." if len(result.non_float) > 3 else "")
        )
    if result.missing:
        click.echo(
            f"{len(result.missing)} tensor(s) in one model only, skipped: "
            + ", ".join(result.missing[:3])
            + (" ..." if len(result.missing) > 3 else "")
        )
    if result.dtype_mismatches:
        click.echo(f"{len(result.dtype_mismatches)} tensor(s) differ in dtype; computed in float32")


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
@layout_options
@run_options("merge")
def merge(
    base: str,
    adapters: tuple[str, ...],
    adapter_opts: tuple[str, ...],
    out: str,
    weights: tuple[float, ...],
    precision: str,
    as_json: bool,
    layouts: dict[str, bool],
    options: RunOptions,
) -> None:
    """Merge LoRA ADAPTER(s) into BASE, as PEFT's merge_and_unload() + save_pretrained would.

    Streams BASE tensor by tensor, never loading the model. With transformers installed
    (stream-tv[transformers]) each module's kind, tying and dtype come from BASE's own model
    definition, and OUT has the tensors PEFT's save writes. Handles rsLoRA, rank/alpha
    patterns, GPT-2 Conv1D, Embedding, torch Conv1d/2d/3d, lora_bias, DoRA, modules_to_save,
    tied embeddings, target_parameters (MoE experts), trainable tokens and
    MultiheadAttention; the config (changed where PEFT's merge changes it) and tokenizer files
    of BASE are copied, so transformers loads OUT.

    \b
    Examples:
      stream-tv merge meta-llama/Llama-3.1-8B ./my-lora -o ./merged
      stream-tv merge ./base --adapter ./lora_a --adapter ./lora_b --weight 0.7 --weight 0.3 -o ./mix
    """
    from ..commands.merge import merge_lora

    if adapters and adapter_opts:
        raise click.UsageError("give adapters either as arguments or with --adapter, not both")
    refs = list(adapters or adapter_opts)
    if not refs:
        raise click.UsageError("no adapter given: stream-tv merge BASE ADAPTER -o OUT")
    result = merge_lora(
        base,
        refs,
        out,
        weights=list(weights) or None,
        precision=precision,
        layouts=layouts,
        options=options,
    )
    if as_json:
        click.echo(result_json(result))
        return
    echo_write_result(result, "merged model")
    click.echo(f"modules, ties and dtypes from {result.basis}")
    if result.dropped:
        click.echo(f"{len(result.dropped)} base tensor(s) not written, as PEFT's save:")
        for key, why in list(result.dropped.items())[:5]:
            click.echo(f"  {key}: {why}")
    for key, value in result.config_updates.items():
        click.echo(f"config.json: {key} set to {json.dumps(value)}, as PEFT's merge does")
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
    callback=dtype_option,
    default="fp32",
    show_default=True,
    help="Storage dtype. fp32 holds PEFT's own delta bits; fp64 computes the products in "
    "float64; bf16/fp16 round each element once.",
)
@click.option(
    "--weight", type=float, default=1.0, show_default=True, help="Multiplies the scaling."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@layout_options
@run_options("lora-delta")
def lora_delta(
    adapter: str,
    out: str,
    base: str | None,
    dtype,
    weight: float,
    as_json: bool,
    layouts: dict[str, bool],
    options: RunOptions,
) -> None:
    """Write ADAPTER's effective delta (scaling * B @ A, in the base's layout) as a task vector.

    Only the tensors the adapter changes are written; `apply` counts the others as zero, so
    `stream-tv apply BASE DELTA` merges it, rounding once (give --base so that the names are
    the base's).

    \b
    Examples:
      stream-tv lora-delta ./my-lora -o ./lora-tv
      stream-tv lora-delta ./my-dora --base meta-llama/Llama-3.1-8B --dtype fp64 -o ./dora-tv
    """
    from ..commands.merge import lora_delta as do_lora_delta

    result = do_lora_delta(
        adapter, out, base=base, dtype=dtype, weight=weight, layouts=layouts, options=options
    )
    if as_json:
        click.echo(result_json(result))
        return
    echo_write_result(result, f"LoRA delta ({result.dtype})")
    click.echo(f"layouts from {result.basis}")
    if result.replaced:
        click.echo(
            f"{len(result.replaced)} tensor(s) saved in the adapter: written as saved - base"
        )
