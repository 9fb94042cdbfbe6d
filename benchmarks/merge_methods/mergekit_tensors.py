"""mergekit 0.1.5's own per-tensor merge on given tensors: the reference stream_tv's
``merging`` module is tested against (tests/test_merging.py). Runs where mergekit is
installed::

    python mergekit_tensors.py IN.safetensors OUT.safetensors JOBS.json

``IN`` holds sets of tensors: ``SET:T/base`` and ``SET:T/0``, ``SET:T/1``, ... for each
tensor ``T`` of a set (the fine-tuned tensors, i.e. base + task vector: mergekit takes
models, not task vectors). ``JOBS`` is a list of ``{"set": SET, "method": "ties",
"parameters": {"weight": [...], "density": [...], ...}, "dtype": "float32" | null,
"out_dtype": "bfloat16" | null, "seeds": [0, ...], "stable_ties": false}``; the parameters
are those of a mergekit YAML config. ``OUT`` gets ``J:T@S``, job ``J``'s merged tensor ``T``
for seed ``S``, computed by ``mergekit.merge_methods.registry.get(method)`` as
``mergekit-yaml`` calls it for one tensor: ``dtype`` is the config's ``dtype:`` (the working
dtype; ``null``: the inputs' promoted dtype), ``out_dtype`` its ``out_dtype:``. Each seed
seeds torch's global generator (DARE/DELLA masks) before the tensor is merged.

``"stable_ties": true`` makes mergekit's magnitude sorts rank equal magnitudes by index as
stream_tv does (the lower flat index ranks higher) instead of in ``argsort``'s arbitrary
order: ``argsort(descending=True)`` becomes a stable sort, an ascending sort its reverse.
Nothing else changes, so the outputs show what differs besides magnitude ties.

Whole models, as ``mergekit-yaml`` merges them (several merges in one process, which saves
mergekit's start-up per merge)::

    python mergekit_tensors.py yaml RUNS.json

``RUNS`` is a list of ``{"config": CONFIG.yml, "out": OUT_DIR, "seed": S | null,
"stable_ties": false}``; each runs ``mergekit.merge.run_merge`` with the options
``mergekit-yaml CONFIG OUT --lazy-unpickle --no-copy-tokenizer [--random-seed S]`` gives.
"""

from __future__ import annotations

import json
import sys

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup
from safetensors.torch import load_file, save_file


class _StableTorch:
    """``torch`` as ``mergekit.sparsify`` sees it, with equal magnitudes ranked by index."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def argsort(x, dim=-1, descending=False):
        order = torch.sort(x, dim=dim, descending=True, stable=True).indices
        return order if descending else order.flip(dim)

    @staticmethod
    def sort(x, dim=-1, descending=False):
        order = _StableTorch.argsort(x, dim=dim, descending=descending)
        return torch.return_types.sort((x.gather(dim, order), order))


def merge_all(tensors: dict[str, torch.Tensor], jobs: list[dict]) -> dict[str, torch.Tensor]:
    import mergekit.sparsify

    plain_torch = mergekit.sparsify.torch
    out = {}
    for j, job in enumerate(jobs):
        method = registry.get(job["method"])
        dtype = getattr(torch, job["dtype"]) if job.get("dtype") else None
        out_dtype = getattr(torch, job["out_dtype"]) if job.get("out_dtype") else None
        mergekit.sparsify.torch = _StableTorch() if job.get("stable_ties") else plain_torch
        prefix = f"{job['set']}:"
        names = sorted(
            {k[len(prefix) :].rsplit("/", 1)[0] for k in tensors if k.startswith(prefix)}
        )
        for name in names:
            inputs = sorted(
                (int(k.rsplit("/", 1)[1]), t)
                for k, t in tensors.items()
                if k.startswith(f"{prefix}{name}/") and not k.endswith("/base")
            )
            base = tensors[f"{prefix}{name}/base"]
            group = TensorGroup.from_tensors(
                [base, *(t for _, t in inputs)], base_index=0, name=name
            )
            for seed in job.get("seeds", [0]):
                torch.manual_seed(seed)
                (merged,) = method(
                    [group], parameters=job["parameters"], dtype=dtype, out_dtype=out_dtype
                )
                out[f"{j}:{name}@{seed}"] = merged.contiguous()
    mergekit.sparsify.torch = plain_torch
    return out


def run_yaml(runs: list[dict]) -> None:
    """Each run as ``mergekit-yaml`` runs it (see the module docstring)."""
    import mergekit.sparsify
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    plain_torch = mergekit.sparsify.torch
    for run in runs:
        mergekit.sparsify.torch = _StableTorch() if run.get("stable_ties") else plain_torch
        options = MergeOptions(
            lazy_unpickle=True, copy_tokenizer=False, random_seed=run.get("seed")
        )
        options.apply_global_options()
        with open(run["config"], encoding="utf-8") as f:
            source = f.read()
        config = MergeConfiguration.model_validate(yaml.safe_load(source))
        run_merge(config, run["out"], options=options, config_source=source)
    mergekit.sparsify.torch = plain_torch


def main(argv: list[str]) -> int:
    if argv and argv[0] == "yaml":
        with open(argv[1]) as f:
            run_yaml(json.load(f))
        return 0
    src, dst, jobs_path = argv
    with open(jobs_path) as f:
        jobs = json.load(f)
    save_file(merge_all(load_file(src), jobs), dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
