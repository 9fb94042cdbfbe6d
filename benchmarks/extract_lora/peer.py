"""benchmarks/run.py's hook for ``--ops extract-lora``: stream-tv against mergekit-extract-lora.

    python benchmarks/extract_lora/peer.py prepare CKPT_DIR WORK_DIR
    python benchmarks/extract_lora/peer.py check OURS THEIRS --base B --finetuned F
    MERGEKIT_VENV/bin/python benchmarks/extract_lora/peer.py mergekit BASE FT OUT --rank R

``prepare``: the row sets for a checkpoint triple of make_checkpoint.py (``CKPT_DIR/base``,
``CKPT_DIR/finetuned``), one per rank (:data:`RANKS`: 16 and 64), as one JSON line (the
contract is in run.py's ``HOOKS`` docstring). Each set times
``stream-tv extract-lora BASE FT -o OUT --rank R`` against ``mergekit-extract-lora
--max-rank R`` on the same inputs; run.py measures wall time and peak RSS of each.

``mergekit``: the peer's command. It runs under mergekit's own interpreter (imports nothing
heavy), sets ``HF_HUB_OFFLINE=1`` (local directories, no Hub) and ``exec``\\s
``mergekit-extract-lora`` next to that interpreter, so the time and RSS measured are
mergekit's own. mergekit is left at its defaults: full SVD of every Linear (changed or not),
embeddings and norms saved whole, factors in the model's dtype.

``check``: the retained energy of both adapters at the same rank, measured the same way
(:func:`mergekit_peer.adapter_energy`: ``1 - ||T - L||^2 / ||T||^2`` in float64 from the stored
factors, streamed): the mean over the tensors both factorise and that changed (mergekit also
factorises unchanged tensors, whose energy is 1 by definition, and would flatter its mean),
and each tool's own mean. ``ok``: ours is within 1e-3 (relative) of mergekit's exact SVD, or
better, and covers every changed tensor mergekit factorised.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RANKS = (16, 64)
TOLERANCE = 1e-3


def prepare(ckpt: str, work: str) -> list[dict]:
    base, ft = os.path.join(ckpt, "base"), os.path.join(ckpt, "finetuned")
    est = _adapter_bytes_per_rank(ckpt)
    sets = []
    for r in RANKS:
        sets.append(
            {
                "label": f"r{r}",
                "inputs": [base, ft],
                "out_bytes": int(est * r),
                "stream_tv": [
                    "extract-lora", base, ft, "-o", "{out}", "--rank", str(r),
                    "--device", "{device}",
                ],
                "peers": {
                    "mergekit": [
                        "{mergekit_venv}/bin/python", os.path.join(HERE, "peer.py"), "mergekit",
                        base, ft, "{out}", "--rank", str(r), "--device", "{device}",
                    ]
                },
                "check": [
                    "{python}", os.path.join(HERE, "peer.py"), "check", "{ours}", "{theirs}",
                    "--base", base, "--finetuned", ft,
                ],
            }
        )  # fmt: skip
    return sets


def _adapter_bytes_per_rank(ckpt: str) -> float:
    """Bytes per unit of rank of a LoRA on every 2-D projection of the base (headers only):
    the floor rows write as much as an adapter of that rank holds, roughly."""
    from safetensors import safe_open

    base = os.path.join(ckpt, "base")
    per = 0
    for name in sorted(os.listdir(base)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(base, name), "pt") as g:
            for k in g.keys():  # noqa: SIM118
                shape = g.get_slice(k).get_shape()
                if len(shape) == 2 and "embed" not in k and "lm_head" not in k:
                    per += (shape[0] + shape[1]) * 2
    return per


def mergekit(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="peer.py mergekit")
    ap.add_argument("base")
    ap.add_argument("finetuned")
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-extract-lora")
    device = "cuda" if a.device.startswith("cuda") else "cpu"
    cmd = [exe, "--model", a.finetuned, "--base-model", a.base, "--out-path", a.out]
    cmd += ["--max-rank", str(a.rank), "--device", device]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    os.execve(exe, cmd, env)


def check(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="peer.py check")
    ap.add_argument("ours")
    ap.add_argument("theirs")
    ap.add_argument("--base", required=True)
    ap.add_argument("--finetuned", required=True)
    a = ap.parse_args(argv)
    sys.path.insert(0, HERE)
    from mergekit_peer import adapter_energy

    ours = adapter_energy(a.base, a.finetuned, a.ours)
    theirs = adapter_energy(a.base, a.finetuned, a.theirs)
    changed = {k for k, v in theirs["tensors"].items() if v["tv_norm2"] > 0}
    common = sorted(changed & set(ours["tensors"]))
    missing = sorted(changed - set(ours["tensors"]))

    def mean(report: dict) -> float | None:
        values = [report["tensors"][k]["retained_energy"] for k in common]
        return sum(values) / len(values) if values else None

    m_ours, m_theirs = mean(ours), mean(theirs)
    ok = not missing and m_ours is not None and m_ours >= m_theirs * (1 - TOLERANCE)
    return {
        "ok": ok,
        "tensors_compared": len(common),
        "mean_retained_energy_ours": m_ours,
        "mean_retained_energy_mergekit": m_theirs,
        "relative_gap": (m_theirs - m_ours) / m_theirs if m_ours and m_theirs else None,
        "missing_in_ours": missing[:5],
        "tensors_ours": ours["modules"],
        "tensors_mergekit": theirs["modules"],
        "own_mean_ours": ours["mean_retained_energy"],
        "own_mean_mergekit": theirs["mean_retained_energy"],
        "bias_tensors_ignored_by_peft_mergekit": len(theirs["bias_tensors_ignored_by_peft"]),
    }


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("prepare", "check", "mergekit"):
        sys.exit(__doc__)
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "prepare":
        if len(rest) != 2:
            sys.exit("usage: peer.py prepare CKPT_DIR WORK_DIR")
        print(json.dumps(prepare(*rest)))
    elif mode == "mergekit":
        mergekit(rest)
    else:
        print(json.dumps(check(rest)))


if __name__ == "__main__":
    main()
