"""adapter_config.json parsing: per-module rank/alpha/scaling as PEFT resolves them, and the
fields that are refused (each with the field named)."""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_tv.errors import AdapterError
from stream_tv.lora.config import load_config, parse_config, pattern_key, scaling

pytest.importorskip("peft")
from peft.utils.other import get_pattern_key  # noqa: E402

BASE = {"peft_type": "LORA", "r": 8, "lora_alpha": 16}


def cfg(**changes):
    return parse_config({**BASE, **changes})


def test_defaults_and_scaling():
    c = cfg()
    assert (c.r, c.lora_alpha, c.use_rslora, c.use_dora) == (8, 16, False, False)
    assert c.scaling_for("model.layers.0.self_attn.q_proj") == 2.0
    rs = cfg(use_rslora=True)
    assert rs.scaling_for("x") == 16 / math.sqrt(8)


def test_scaling_formula_is_peft_update_layer():
    # PEFT: lora_alpha / math.sqrt(r) with rslora, else lora_alpha / r (Python floats)
    for alpha, r in [(16, 8), (7, 3), (1, 64), (32.5, 12)]:
        assert scaling(alpha, r) == alpha / r
        assert scaling(alpha, r, rslora=True) == alpha / math.sqrt(r)


def test_rank_and_alpha_patterns_first_match_wins():
    c = cfg(
        rank_pattern={"layers.1.self_attn.q_proj": 2, "q_proj": 4},
        alpha_pattern={r"layers\.[01]\.mlp\..*": 3},
    )
    assert c.rank_for("model.layers.1.self_attn.q_proj") == 2
    assert c.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert c.rank_for("model.layers.11.self_attn.q_proj") == 4
    assert c.rank_for("model.layers.0.self_attn.k_proj") == 8
    assert c.alpha_for("model.layers.0.mlp.up_proj") == 3
    assert c.alpha_for("model.layers.2.mlp.up_proj") == 16
    assert c.scaling_for("model.layers.1.self_attn.q_proj") == 16 / 2


_names = st.lists(
    st.sampled_from(
        ["model", "layers", "0", "1", "11", "self_attn", "q_proj", "mlp", "up_proj", "h"]
    ),
    min_size=1,
    max_size=6,
).map(".".join)
_patterns = st.lists(
    st.one_of(
        _names,
        st.sampled_from([r"layers\.[01]\..*", r".*proj", "q_proj|up_proj", r"\d+\.mlp.*"]),
    ),
    max_size=4,
    unique=True,
)


@settings(max_examples=300, deadline=None)
@given(patterns=_patterns, module=_names)
def test_pattern_key_matches_peft(patterns, module):
    """The same key as PEFT's own get_pattern_key (which returns the module name on no match)."""
    mine = pattern_key(dict.fromkeys(patterns, 1), module)
    peft = get_pattern_key(patterns, module)
    assert (mine if mine is not None else module) == peft


def test_peft_dataclass_fields_are_all_classified():
    """Every field of the installed LoraConfig is interpreted, harmless, or refused: a new PEFT
    field must be looked at before it is silently ignored."""
    import dataclasses

    from peft import LoraConfig

    from stream_tv.lora import config as C

    known = C._HARMLESS | C._INTERPRETED | set(C._REFUSED_WHEN_SET)
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert fields - known == set()


def test_peft_saved_config_parses(tmp_path):
    from peft import LoraConfig

    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True).save_pretrained(
        tmp_path
    )
    c = load_config(tmp_path)
    assert (c.r, c.lora_alpha, c.use_dora, c.target_modules) == (4, 8, True, ("q_proj",))


# ---- refusals: one test per reason, each naming the field ---------------------------------


def refused(match: str, **changes):
    with pytest.raises(AdapterError, match=match) as e:
        parse_config({**BASE, **changes})
    return str(e.value)


def test_missing_config(tmp_path):
    with pytest.raises(AdapterError, match="no adapter_config.json") as e:
        load_config(tmp_path)
    assert "save_pretrained" in str(e.value)


def test_malformed_json(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="not a JSON object"):
        load_config(tmp_path)


def test_peft_type_missing_or_not_lora():
    with pytest.raises(AdapterError, match="'peft_type': missing"):
        parse_config({"r": 8})
    msg = refused("'peft_type'", peft_type="IA3")
    assert "'IA3' is not LORA" in msg


@pytest.mark.parametrize(
    "init", ["pissa", "pissa_niter_16", "olora", "corda", "loftq", "lora_ga", "mica"]
)
def test_inits_that_rewrite_the_base(init):
    msg = refused("'init_lora_weights'", init_lora_weights=init)
    assert repr(init) in msg


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_plain_inits_accepted(init):
    assert cfg(init_lora_weights=init).init_lora_weights == init


def test_unknown_init_refused():
    refused("unknown initialisation 'magic'", init_lora_weights="magic")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_qalora", True),
        ("megatron_config", {"tensor_model_parallel_size": 2}),
        ("layer_replication", [[0, 2], [1, 2]]),
        ("alora_invocation_tokens", [5, 6]),
        ("arrow_config", {"top_k": 2}),
        ("velora_config", {"rank": 2}),
        ("monteclora_config", {"n": 2}),
        ("use_bdlora", {"nblocks": 2}),
        ("kasa_config", {"beta": 1}),
    ],
)
def test_variant_fields_refused(field, value):
    msg = refused(f"'{field}'", **{field: value})
    assert "is set" in msg


def test_variant_fields_at_default_are_fine():
    c = cfg(
        use_qalora=False,
        megatron_config=None,
        layer_replication=None,
        target_parameters=None,
        lora_dropout=0.1,
        trainable_token_indices=None,
        arrow_config=None,
    )
    assert c.r == 8


def test_target_parameters_and_trainable_tokens_are_read():
    c = cfg(target_parameters=["mlp.experts.gate_up_proj"], trainable_token_indices=[1, 2])
    assert c.target_parameters == ("mlp.experts.gate_up_proj",)
    assert dict(c.trainable_tokens) == {"": (1, 2)}
    c = cfg(trainable_token_indices={"embed_tokens": [3], "lm_head": [4, 5]})
    assert dict(c.trainable_tokens) == {"embed_tokens": (3,), "lm_head": (4, 5)}
    refused("'trainable_token_indices'.*repeats a token id", trainable_token_indices=[1, 1])
    refused("'trainable_token_indices'.*not a list of token ids", trainable_token_indices=[-1])
    refused("'target_parameters'.*not a list", target_parameters="mlp.gate.weight")


def test_dora_with_lora_bias_refused():
    refused("'lora_bias'.*use_dora", use_dora=True, lora_bias=True)


def test_unknown_field_set_is_refused_default_is_ignored():
    refused("'use_magic': unknown field", use_magic=True)
    assert cfg(use_magic=None, some_list=[]).r == 8


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("r", 0, "'r': 0 is not a positive integer"),
        ("r", "8", "'r'"),
        ("lora_alpha", "x", "'lora_alpha'"),
        ("rank_pattern", {"q_proj": -1}, "rank_pattern"),
        ("rank_pattern", {"(": 2}, "not a valid regular expression"),
        ("alpha_pattern", [1], "'alpha_pattern'"),
        ("bias", "some", "'bias'"),
        ("target_modules", 3, "'target_modules'"),
        ("init_lora_weights", 3, "'init_lora_weights'"),
    ],
)
def test_malformed_fields(field, value, match):
    refused(re.escape(match) if "(" in match else match, **{field: value})


def test_message_names_the_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({**BASE, "peft_type": "PREFIX_TUNING"})
    )
    with pytest.raises(AdapterError) as e:
        load_config(tmp_path)
    assert str(tmp_path / "adapter_config.json") in str(e.value)
