"""The README's first command: `stream-tv demo DIR` makes its own example and runs the main job."""

import json

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from stream_tv.cli import cli


def _load(directory):
    out = {}
    for f in sorted(directory.glob("model-*.safetensors")):
        out.update(load_file(f))
    return out


def test_demo_runs_merge_extract_compare(tmp_path):
    target = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", str(target), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "All 16 LoRA tensors are exactly base + LoRA merged as PEFT does" in result.output

    report = json.loads((target / "report.json").read_text())
    assert report["schema_version"] == 2
    cov = report["coverage"]
    assert (cov["lora_and_changed"], cov["changed_not_lora"], cov["unchanged"]) == (16, 0, 23)
    assert 0.9999 < report["summary"]["min_cosine"] <= 1.0
    assert (target / "report.md").read_text().startswith("#")

    # The task vector it wrote is exactly merged - base.
    base, merged, tv = (
        _load(target / "base"),
        _load(target / "merged"),
        _load(target / "task-vector"),
    )
    for name, t in tv.items():
        assert torch.equal(t, merged[name].float() - base[name].float()), name

    # A second run refuses to clobber the directory without --overwrite.
    again = CliRunner().invoke(cli, ["demo", str(target), "--quiet"])
    assert again.exit_code == 2
    assert "--overwrite" in again.output
