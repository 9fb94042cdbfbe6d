"""``stream-tv apply``: task arithmetic, TIES, DARE, breadcrumbs, DELLA of task vectors,
fine-tuned models and LoRA adapters, into a base."""

from __future__ import annotations

import click

from ..options import RunOptions
from .base import cli, dtype_option, echo_write_result, layout_options, result_json, run_options

# stream_tv.merging.METHODS, without importing torch here (tests/test_apply_methods.py checks)
METHOD_NAMES = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
)
KIND_NAMES = ("auto", "tv", "finetuned", "adapter")


@cli.command()
@click.argument("base")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT [INPUT ...]")
@click.option("-o", "--output", "out", required=True, help="Output directory.")
@click.option(
    "--method",
    type=click.Choice(METHOD_NAMES),
    default="task_arithmetic",
    show_default=True,
    help="How the task vectors are combined, as mergekit 0.1.5 defines it (README: formulas).",
)
@click.option(
    "--scale",
    "scales",
    multiple=True,
    type=float,
    help="Weight of each input, in order (default 1.0; one value applies to all; negative "
    "to subtract).",
)
@click.option(
    "--density",
    multiple=True,
    type=float,
    help="Fraction of each task vector kept, in (0, 1] (ties, dare_*, breadcrumbs*, della*; "
    "default 1); one value for all or one per input.",
)
@click.option(
    "--lambda", "lam", type=float, default=None, help="Scales the merged delta [default: 1]."
)
@click.option(
    "--gamma",
    multiple=True,
    type=float,
    help="breadcrumbs*: fraction of the largest magnitudes dropped [default: 0.01].",
)
@click.option(
    "--epsilon",
    multiple=True,
    type=float,
    help="della*: keep probabilities span density +/- epsilon by magnitude rank [default: 0.15].",
)
@click.option(
    "--normalize/--no-normalize",
    default=None,
    help="Divide by the sum of the (agreeing) weights [default: on for ties and della].",
)
@click.option(
    "--rescale",
    type=click.Choice(["l1", "density", "none"]),
    default=None,
    help="Sparsified task vectors: l1 (mergekit's, default for dare_* and della*: keep each "
    "one's l1 norm), density (1/density, the DARE paper) or none.",
)
@click.option("--seed", type=int, default=None, help="dare_*, della*: the masks' seed [0].")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(KIND_NAMES),
    help="What each input is, in order (one for all): auto (default: an adapter has "
    "adapter_config.json, a stream-tv output its index; anything else is a task vector), tv, "
    "finetuned (its task vector taken on the fly), adapter.",
)
@click.option("--dtype", callback=dtype_option, help="Output dtype (default: the base's).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@layout_options
@run_options("apply")
def apply(base: str, inputs: tuple[str, ...], out: str, as_json: bool, **kw) -> None:
    """Write BASE plus the task vectors of the INPUTs, combined by --method.

    Each INPUT is a task vector (from `extract`), a fine-tuned model of BASE, or a PEFT LoRA
    adapter; the task vectors of models and adapters are taken on the fly, chunk by chunk, as
    `extract` and `lora-delta` compute them. task_arithmetic (the default) writes
    BASE + sum(scale_i * tau_i), in float32, rounded once to the base's dtype; the other
    methods follow mergekit 0.1.5, in float64, rounded once.

    \b
    Examples:
      stream-tv apply ./base ./tv -o ./merged                     # base + tv
      stream-tv apply ./base ./tv --scale -1 -o ./negated         # task negation
      stream-tv apply ./base ./ft_a ./ft_b ./lora_c --method ties --density 0.5 \\
          --scale 1 --scale 0.5 --scale 0.7 -o ./ties
      stream-tv apply ./base ./ft_a ./ft_b --method dare_linear --density 0.3 --seed 7 -o ./dare
    """
    from ..commands.apply import apply_task_vectors

    options: RunOptions = kw.pop("options")
    result = apply_task_vectors(
        base,
        list(inputs),
        out,
        scales=list(kw["scales"]) or None,
        dtype=kw["dtype"],
        method=kw["method"],
        density=list(kw["density"]) or None,
        gamma=list(kw["gamma"]) or None,
        epsilon=list(kw["epsilon"]) or None,
        lam=1.0 if kw["lam"] is None else kw["lam"],
        normalize=kw["normalize"],
        rescale=kw["rescale"],
        seed=kw["seed"],
        kinds=list(kw["kinds"]) or None,
        layouts=kw["layouts"],
        options=options,
    )
    for line in result.warnings:
        click.echo(f"warning: {line}", err=True)
    if as_json:
        click.echo(result_json(result))
        return
    echo_write_result(result, "model")
    click.echo(
        f"scales: {_fmt(result.scales)}; {len(result.untouched)} tensor(s) copied from the base "
        "unchanged"
    )
    plain = result.parameters == {"lambda": 1.0, "normalize": False}
    if result.method != "task_arithmetic" or not plain or set(result.kinds) != {"tv"}:
        params = "".join(f", {k} {_fmt(v)}" for k, v in result.parameters.items())
        click.echo(f"method {result.method}{params}; inputs: {', '.join(result.kinds)}")


def _fmt(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
